"""What `rap importance` says before it computes scores: roughly how long, and which command
the package's shipped scores answer at once.

The estimate scales the shipped run of the same method (its `details` record the seconds, on
the 2-core CPU that scored them) by the work the settings ask for. GSI's work, in full
evaluations, for N blocks, a screen on a fraction s of the tokens and F finalists, is
Σ_n (s·n + F·(1 − s)) (all n candidates in full once n ≤ F), as docs/importance.md derives it;
one-shot runs each block once from its layer, about N/2 full evaluations; Block Influence one
pass. Evaluations cost about tokens × layers. A rough figure by design: the device, the threads
and the model's width change it, and the notice says so.
"""

from __future__ import annotations

from typing import Any

from rap.core.loading import DEFAULT_MODEL_ID
from rap.core.scores import BlockScores, load_default_scores, shipped_path


def _work(method: str, blocks: int, screen_fraction: float, finalists: int) -> float:
    """Full-evaluation equivalents of one run of `method` (module doc)."""
    if method == "gsi":
        s = min(max(screen_fraction, 0.0), 1.0)
        return sum(
            n if n <= finalists or s >= 1.0 else s * n + finalists * (1 - s)
            for n in range(1, blocks + 1)
        )
    if method == "oneshot":
        return blocks / 2 + 1
    return 1.0


def _screen_fraction(settings: Any) -> float:
    if settings.screen_batches == 0:  # --exact
        return 1.0
    return settings.screen_batches * settings.batch_size * settings.seq_len / settings.tokens


def estimate_seconds(ref: BlockScores, num_layers: int, settings: Any) -> float:
    """Seconds for `settings` on a model of `num_layers` layers, scaled from the shipped run."""
    d = ref.details
    seconds = float(d.get("gsi_seconds_all_sessions") or d.get("seconds") or 0.0)
    ref_tokens = ref.calibration.tokens if ref.calibration else settings.tokens
    ref_fraction = 1.0 if d.get("exact") else d.get("screen_tokens", ref_tokens) / ref_tokens
    ref_work = _work(ref.method, 2 * ref.num_layers, ref_fraction, d.get("finalists", 0))
    work = _work(settings.method, 2 * num_layers, _screen_fraction(settings), settings.finalists)
    scale = (work * settings.tokens * num_layers) / (ref_work * ref_tokens * ref.num_layers)
    return seconds * scale


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def shipped_command(ref: BlockScores) -> str:
    """The `rap importance` command whose settings the shipped scores `ref` answer."""
    model = "" if ref.model == DEFAULT_MODEL_ID else f" --model {ref.model}"
    cmd = f"rap importance{model} --method {ref.method}"
    if ref.calibration is not None:
        c = ref.calibration
        cmd += f" --tokens {c.tokens} --seq-len {c.seq_len}"
        cmd += f" --half {c.half}" if c.half else ""
    if ref.method == "gsi":
        d, seq_len = ref.details, ref.calibration.seq_len if ref.calibration else 1
        if d.get("exact"):
            cmd += " --exact"
        else:  # the shipped match compares screen tokens: batches × chunks × seq_len
            cmd += f" --batch-size {d['screen_tokens'] // seq_len} --screen-batches 1"
        cmd += f" --finalists {d['finalists']}"
    return cmd + f" --dtype {ref.dtype}"


def compute_notice(model_id: str, num_layers: int, settings: Any) -> str:
    """What to say before computing `settings`'s scores for `model_id` (module doc)."""
    ref = load_default_scores(settings.method)
    seconds = estimate_seconds(ref, num_layers, settings)
    threads = ref.details.get("threads", "?")
    lines = [
        f"no shipped or cached {settings.method} scores answer these settings: computing them, "
        f"roughly {duration(seconds)} (scaled from the shipped {ref.model} run on {threads} "
        "CPU threads; a wider model takes longer, a GPU less); the progress bar starts when "
        "the first step ends"
    ]
    shipped = shipped_path(model_id, settings.method)
    if shipped.is_file():
        command = shipped_command(BlockScores.from_file(shipped))
        lines.append(f"the shipped scores answer at once: {command}")
    return "\n".join(lines)
