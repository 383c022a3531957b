"""Benchmark traces: requests and a memory budget, fixed before any system runs.

A trace (`rap/data/traces/<name>.json`, a `Trace`) is made once by `python -m rap.ops.traces
make NAME` and committed; every result records its `sha256` (of the file's canonical JSON
without that field), and `load_trace` refuses a file whose contents no longer match it.

Time is in *trace seconds*: requests arrive as a Poisson process of rate 1 per trace second,
`burst_factor` times faster inside the bursts. A run stretches the trace by 1 / λ, λ being
`capacity_share` (0.7) × the requests per second that `dense-high` sustains, measured in that
run; the budget's steps stretch with it.

Lengths: (prompt, output) pairs drawn with replacement from the 19,366 requests of the Azure
LLM inference trace 2023, conversation service — Patel, Choukse, Zhang, Shah, Goiri, Maleki,
Bianchini, "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024;
data `data/AzureLLMInferenceTrace_conv.csv` of github.com/Azure/AzurePublicDataset (commit
b469a11, CC-BY 4.0), copied as `rap/data/traces/azure-llm-2023-conv-lengths.csv` (medians 1,020
prompt and 129 output tokens) — then multiplied by `length_scale` (a 2-core CPU serves a small
model at tens of tokens per second: the shape is the published one, the scale is the machine's)
and clipped to [`min_tokens`, `max_prompt_tokens`] and [`min_tokens`, `max_output_tokens`].

Budget: fractions of the replica's high budget (the bytes `dense-high` sizes its pool for), a
co-tenant taking 30 % and later 60 % of it for a while and giving it back; the deeper shock
falls below the dense weights plus the running rows' KV (`rap.ops.bench` checks it for the
model it runs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
from pathlib import Path

from pydantic import BaseModel, Field

from rap.core.constants import DATA_DIR
from rap.core.errors import RapError

TRACES = DATA_DIR / "traces"
LENGTHS = TRACES / "azure-llm-2023-conv-lengths.csv"


class TraceRequest(BaseModel):
    t: float = Field(ge=0, description="Arrival, trace seconds.")
    prompt_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1, description="Output tokens asked (EOS ignored: equal work).")


class BudgetStep(BaseModel):
    t: float = Field(ge=0, description="From this trace second on.")
    fraction: float = Field(gt=0, le=1, description="Share of the high budget the replica has.")
    label: str = Field(description="What happens (for timelines).")


class ServiceLevels(BaseModel):
    ttft_s: float = Field(gt=0, description="Time to first token a request must meet.")
    tpot_s: float = Field(gt=0, description="Mean time per output token after the first.")


class Trace(BaseModel):
    """A benchmark trace (module doc)."""

    name: str
    description: str
    lengths_source: str = Field(description="Where the lengths come from (citation).")
    length_scale: float = Field(gt=0)
    capacity_share: float = Field(0.7, gt=0, le=1, description="λ / dense-high's capacity.")
    slo: ServiceLevels
    seed: int
    requests: list[TraceRequest]
    budget: list[BudgetStep]
    sha256: str = ""

    @property
    def duration(self) -> float:
        """Trace seconds from the first step to the last arrival."""
        return max(r.t for r in self.requests)

    def digest(self) -> str:
        body = self.model_dump(mode="json", exclude={"sha256"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_lengths(path: Path = LENGTHS) -> list[tuple[int, int]]:
    """(prompt, output) token pairs of the published trace, in its order."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return [(int(a), int(b)) for a, b in list(csv.reader(lines))[1:]]


def arrivals(
    n: int, rng: random.Random, bursts: list[tuple[float, float]], factor: float
) -> list[float]:
    """`n` arrival times of a Poisson process of rate 1, `factor` inside each (start, end)
    burst (by thinning's dual: exponential gaps at the local rate)."""
    t = 0.0
    out: list[float] = []
    for _ in range(n):
        rate = factor if any(a <= t < b for a, b in bursts) else 1.0
        t += rng.expovariate(rate)
        out.append(round(t, 3))
    return out


def make_shock(seed: int = 16) -> Trace:
    """The `shock` trace: 240 requests over ~173 trace seconds, bursts ×3, two shocks."""
    rng = random.Random(seed)
    pairs = read_lengths()
    scale, lo, max_prompt, max_out = 1 / 8, 8, 512, 96
    n = 240
    times = arrivals(n, rng, bursts=[(40.0, 55.0), (130.0, 145.0)], factor=3.0)
    requests = []
    for t in times:
        p, o = rng.choice(pairs)
        requests.append(
            TraceRequest(
                t=t,
                prompt_tokens=min(max(round(p * scale), lo), max_prompt),
                max_tokens=min(max(round(o * scale), lo), max_out),
            )
        )
    end = times[-1]
    budget = [
        BudgetStep(t=0.0, fraction=1.0, label="high"),
        BudgetStep(t=round(0.20 * end, 1), fraction=0.7, label="co-tenant takes 30 %"),
        BudgetStep(t=round(0.35 * end, 1), fraction=1.0, label="given back"),
        BudgetStep(t=round(0.55 * end, 1), fraction=0.4, label="co-tenant takes 60 %"),
        BudgetStep(t=round(0.75 * end, 1), fraction=1.0, label="given back"),
    ]
    trace = Trace(
        name="shock",
        description="Poisson arrivals with two ×3 bursts; a co-tenant takes 30 % then 60 % of "
        "the replica's high budget and gives it back (rap.ops.traces).",
        lengths_source="Azure LLM inference trace 2023, conversation (Patel et al., Splitwise, "
        "ISCA 2024; github.com/Azure/AzurePublicDataset b469a11, CC-BY 4.0), scaled by 1/8, "
        f"clipped to prompt [{lo}, {max_prompt}] and output [{lo}, {max_out}] tokens",
        length_scale=scale,
        slo=ServiceLevels(ttft_s=5.0, tpot_s=0.5),
        seed=seed,
        requests=requests,
        budget=budget,
    )
    return trace.model_copy(update={"sha256": trace.digest()})


def load_trace(name_or_path: str) -> Trace:
    """A committed trace by name (`shock`) or path; refused if its hash does not match."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TRACES / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in TRACES.glob("*.json"))
        raise RapError(f"no trace {name_or_path!r}", expected=f"one of {known} or a file path")
    trace = Trace.model_validate_json(path.read_text())
    if trace.sha256 != trace.digest():
        raise RapError(
            f"trace {path} does not match its recorded sha256 (edited after it was made?)",
            fix=f"regenerate it: python -m rap.ops.traces make {trace.name}",
        )
    return trace


MAKERS = {"shock": make_shock}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "make" or args[1] not in MAKERS:
        print(f"usage: python -m rap.ops.traces make {{{','.join(MAKERS)}}}", file=sys.stderr)
        return 2
    trace = MAKERS[args[1]]()
    path = TRACES / f"{trace.name}.json"
    path.write_text(trace.model_dump_json(indent=1) + "\n")
    print(f"wrote {path}: {len(trace.requests)} requests, sha256 {trace.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
