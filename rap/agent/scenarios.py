"""Named workloads: traffic and memory pressure, registered by name with a split.

A scenario is traffic plus memory pressure (the simulation that turns it into the states the
agent decides on is `rap.agent.workloads`):

- lengths: prompt and output tokens are log-normal, ln X ~ N(ln median, σ²), clipped to
  [lo, hi] — heavy-tailed like chat traffic (most prompts short, a few very long);
- memory: the bytes the device leaves the replica, `m(t) · reference` with `reference` the dense
  model's peak at the scenario's (ref_batch, ref_seq) and m(t) one of steady (level +
  N(0, noise²)), steps (cycling through `levels` every `period_s`), ramp (linear from level to
  low over `period_s`, then back) or spikes (other tenants arrive as a Poisson process of rate
  1/period_s and take up to `level − low` for an exponential time of mean period_s/2).

Scenarios have a split, frozen (docs/results.md, "Protocol"):

- `train`: what the agent trains on (seeds 0, 1, ...);
- `validation`: every tuning decision — reward, penalties, training grid, which policy to ship
  — is taken here (seeds VALIDATION_SEED_BASE + i). These are the scenarios once called
  held-out: six policy versions were judged on them, so they are retired into validation;
- `test`: scenarios no decision has seen (seeds TEST_SEED_BASE + i), read only by a `--final`
  comparison, once per shipped policy, recorded in the ledger (`bench/results/ledger.jsonl`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rap.core.errors import RapError

VALIDATION_SEED_BASE = 10_000
TEST_SEED_BASE = 20_000
SEED_BASE = {"train": 0, "validation": VALIDATION_SEED_BASE, "test": TEST_SEED_BASE}
"""The first seed of each split: seeds never overlap between splits."""
Split = Literal["train", "validation", "test"]
MemoryKind = Literal["steady", "steps", "ramp", "spikes"]


@dataclass(frozen=True)
class LengthDist:
    """Log-normal token counts: ln X ~ N(ln median, σ²), rounded and clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator) -> int:
        x = math.exp(math.log(self.median) + self.sigma * float(rng.standard_normal()))
        return int(min(max(round(x), self.lo), self.hi))


@dataclass(frozen=True)
class MemoryTrace:
    """m(t), the fraction of the reference bytes the device leaves the replica (module doc)."""

    kind: MemoryKind
    level: float = 1.0
    low: float = 0.8
    period_s: float = 60.0
    noise: float = 0.0
    levels: tuple[float, ...] = ()

    def fractions(self, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """m(t) at each time in `times` (seconds, ascending)."""
        if self.kind == "steady":
            out = np.full(times.shape, self.level)
        elif self.kind == "steps":
            levels = np.array(self.levels or (self.level, self.low))
            out = levels[(times // self.period_s).astype(int) % len(levels)]
        elif self.kind == "ramp":
            phase = (times % (2 * self.period_s)) / self.period_s  # 0→1 down, 1→2 back up
            depth = np.where(phase <= 1.0, phase, 2.0 - phase)
            out = self.level - (self.level - self.low) * depth
        else:
            out = np.full(times.shape, self.level) - self._spikes(times, rng)
        if self.noise:
            out = out + self.noise * rng.standard_normal(times.shape)
        return np.clip(out, 0.05, 1.5)

    def _spikes(self, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Bytes taken by other tenants: Poisson arrivals, exponential stays, depths up to
        level − low (uniform in [0.5, 1] of it), overlapping tenants add up to that depth."""
        horizon = float(times[-1]) if len(times) else 0.0
        taken = np.zeros(times.shape)
        t = 0.0
        while True:
            t += float(rng.exponential(self.period_s))
            if t > horizon:
                break
            stay = float(rng.exponential(self.period_s / 2))
            depth = (self.level - self.low) * float(rng.uniform(0.5, 1.0))
            taken += np.where((times >= t) & (times < t + stay), depth, 0.0)
        return np.minimum(taken, self.level - self.low)


@dataclass(frozen=True)
class Scenario:
    """Traffic and memory pressure of one named workload (module doc)."""

    name: str
    split: Split
    description: str
    rate_rps: float
    prompt: LengthDist
    output: LengthDist
    max_batch: int
    memory: MemoryTrace
    ref_batch: int
    ref_seq: int
    burst: float = 1.0
    burst_s: float = 0.0
    service_s: tuple[float, float, float] = (0.05, 2e-5, 0.01)
    """(t_0, c_p per prompt token per request, c_d per decode step) of a batch's duration."""
    grid: tuple[tuple[int, ...], tuple[int, ...], float, float] | None = None
    """Instead of traffic: (batches, sequence lengths, lo, hi): the controller's bucket grid,
    each bucket (B, S, P = S) under a budget of U(lo, hi) × its dense peak."""


@dataclass(frozen=True)
class Situation:
    """What the agent decides on: a batch (B, S, P) starting at t under a budget in bytes."""

    t_s: float
    batch: int
    seq: int
    prefill: int
    budget_bytes: int
    scenario: str = ""


# -- the registry -----------------------------------------------------------------------------
CHAT_PROMPT = LengthDist(median=250, sigma=1.0, lo=8, hi=1800)
CHAT_OUTPUT = LengthDist(median=120, sigma=0.8, lo=4, hi=768)
SHORT_PROMPT = LengthDist(median=40, sigma=0.6, lo=4, hi=200)
SHORT_OUTPUT = LengthDist(median=48, sigma=0.5, lo=4, hi=128)
LONG_PROMPT = LengthDist(median=1500, sigma=0.3, lo=900, hi=1800)
LONG_OUTPUT = LengthDist(median=200, sigma=0.4, lo=64, hi=248)


def register(sc: Scenario) -> Scenario:
    """Add a scenario to the registry (names are unique)."""
    if sc.name in SCENARIOS:
        raise RapError(f"scenario {sc.name!r} is already registered")
    SCENARIOS[sc.name] = sc
    return sc


def get(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise RapError(f"unknown scenario {name!r}", expected=f"one of {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def names(split: Split | None = None) -> list[str]:
    """Registered scenario names, of one split or all."""
    return [n for n, sc in SCENARIOS.items() if split is None or sc.split == split]


BUILTIN: tuple[Scenario, ...] = (
    Scenario(
        "chat-steady",
        "train",
        "chat traffic, a steady squeeze",
        3.0,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        8,
        MemoryTrace("steady", 0.9, noise=0.03),
        8,
        1024,
    ),
    Scenario(
        "chat-steps",
        "train",
        "chat traffic, memory steps as tenants come and go",
        3.0,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        8,
        MemoryTrace("steps", levels=(0.95, 0.85, 0.9, 0.8), period_s=30.0),
        8,
        1024,
    ),
    Scenario(
        "short-b1-ramp",
        "train",
        "batch 1, short prompts (weights dominate), a ramp",
        0.5,
        SHORT_PROMPT,
        SHORT_OUTPUT,
        1,
        MemoryTrace("ramp", 0.99, 0.92, 120.0),
        1,
        256,
    ),
    Scenario(
        "long-kv-spikes",
        "train",
        "batches of 8-16 at ~2K tokens (KV dominates), spikes",
        40.0,
        LONG_PROMPT,
        LONG_OUTPUT,
        16,
        MemoryTrace("spikes", 0.98, 0.75, 8.0),
        16,
        2048,
    ),
    Scenario(
        "mixed-burst",
        "train",
        "bursty mixed traffic, noisy steady memory",
        1.5,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        12,
        MemoryTrace("steady", 0.9, noise=0.04),
        8,
        1536,
        burst=8.0,
        burst_s=10.0,
    ),
    Scenario(
        "bucket-grid",
        "train",
        "the controller's bucket grid under random budgets",
        1.0,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        8,
        MemoryTrace("steady"),
        8,
        1024,
        grid=((1, 2, 4, 8, 16), (128, 256, 512, 1024, 2048), 0.25, 0.98),
    ),
    # validation (the scenarios once held out; tuned on): other traces, parameters, seeds
    Scenario(
        "eval-chat-spikes",
        "validation",
        "chat traffic, other tenants' spikes",
        3.0,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        8,
        MemoryTrace("spikes", 0.95, 0.8, 10.0),
        8,
        1024,
    ),
    Scenario(
        "eval-b1-steps",
        "validation",
        "batch 1, short prompts (weights dominate), steps",
        0.5,
        SHORT_PROMPT,
        SHORT_OUTPUT,
        1,
        MemoryTrace("steps", levels=(0.98, 0.95, 0.93), period_s=40.0),
        1,
        256,
    ),
    Scenario(
        "eval-kv-2048",
        "validation",
        "batches of 8+ at 2,048 tokens (KV dominates), a ramp",
        60.0,
        LONG_PROMPT,
        LONG_OUTPUT,
        12,
        MemoryTrace("ramp", 0.97, 0.8, 30.0),
        12,
        2048,
    ),
    Scenario(
        "eval-burst-steps",
        "validation",
        "bursty mixed traffic, memory steps",
        2.0,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        12,
        MemoryTrace("steps", levels=(0.92, 0.82, 0.87), period_s=25.0),
        8,
        1536,
        burst=6.0,
        burst_s=8.0,
    ),
    Scenario(
        "eval-controller-grid",
        "validation",
        "the controller's default buckets, budgets 75-97 % of their dense peak",
        1.0,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        8,
        MemoryTrace("steady"),
        8,
        1024,
        grid=((1, 4, 8), (256, 1024, 2048), 0.75, 0.97),
    ),
)
TEST: tuple[Scenario, ...] = (
    # test: written before any method ran on them, read only by a --final comparison
    Scenario(
        "test-chat-ramp",
        "test",
        "chat traffic, a slow ramp down to 78 %",
        2.5,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        8,
        MemoryTrace("ramp", 0.96, 0.78, 45.0),
        8,
        1024,
    ),
    Scenario(
        "test-b1-spikes",
        "test",
        "batch 1, short prompts (weights dominate), other tenants' spikes",
        0.7,
        SHORT_PROMPT,
        SHORT_OUTPUT,
        1,
        MemoryTrace("spikes", 0.99, 0.9, 20.0),
        1,
        512,
    ),
    Scenario(
        "test-kv-16x1024",
        "test",
        "batches up to 16 at ~1,700 tokens (KV dominates), memory steps",
        50.0,
        LONG_PROMPT,
        LONG_OUTPUT,
        16,
        MemoryTrace("steps", levels=(0.9, 0.8, 0.86), period_s=20.0),
        16,
        1024,
    ),
    Scenario(
        "test-mixed-steady",
        "test",
        "bursty chat at 8 × 2,048, a noisy steady squeeze",
        2.0,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        8,
        MemoryTrace("steady", 0.86, noise=0.04),
        8,
        2048,
        burst=4.0,
        burst_s=6.0,
    ),
    Scenario(
        "test-controller-grid",
        "test",
        "the controller's default buckets, budgets 70-95 % of their dense peak",
        1.0,
        CHAT_PROMPT,
        CHAT_OUTPUT,
        8,
        MemoryTrace("steady"),
        8,
        1024,
        grid=((1, 4, 8), (256, 1024, 2048), 0.70, 0.95),
    ),
)
SCENARIOS: dict[str, Scenario] = {sc.name: sc for sc in (*BUILTIN, *TEST)}
"""Every scenario by name: the built-in ones, and any a caller `register`s."""
