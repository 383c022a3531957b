"""Seeded workloads: what one replica sees over time, as the states the RAP agent decides on.

A scenario is traffic plus memory pressure:

- arrivals: a Poisson process of rate λ requests/s, optionally bursty (a two-state Markov-
  modulated Poisson process: rate λ·burst for exponentially long bursts of mean `burst_s`);
- lengths: prompt and output tokens are log-normal, ln X ~ N(ln median, σ²), clipped to
  [lo, hi] — heavy-tailed like chat traffic (most prompts short, a few very long);
- batches: one server takes up to `max_batch` waiting requests (first come first served) when it
  is free; a batch of B requests with longest prompt P and longest total S (prompt + output)
  busies it for t = t_0 + c_p·B·P + c_d·(S − P) seconds;
- memory: the bytes the device leaves the replica, `m(t) · reference` with `reference` the dense
  model's bytes at the scenario's (ref_batch, ref_seq) (`dense_bytes`: weights + KV + the engine
  step, the one byte accounting) and m(t) one of
  steady (level + N(0, noise²)), steps (cycling through `levels` every `period_s`), ramp (linear
  from level to low over `period_s`, then back) or spikes (other tenants arrive as a Poisson
  process of rate 1/period_s and take up to `level − low` for an exponential time of mean
  period_s/2).

`situations(name, config, dtype, seed, count)` yields, at each batch start, a `Situation` (B, S,
P, budget bytes) of a scenario registered in `rap.agent.scenarios`. Pure Python and numpy; the
same (scenario, seed) always gives the same situations.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rap.agent.scenarios import Scenario, Situation, get
from rap.core import byte_table, memory

MAX_OVER = 1.2
"""A batch whose dense peak is above MAX_OVER × budget is split by admission."""


@dataclass
class _Request:
    arrival_s: float
    prompt: int
    output: int


Batch = tuple[float, list[_Request]]


@dataclass
class _Arrivals:
    """A (possibly bursty) Poisson process of requests."""

    sc: Scenario
    rng: np.random.Generator
    t: float = 0.0
    burst_until: float = -1.0
    pending: deque[_Request] = field(default_factory=deque)

    def next(self) -> _Request:
        sc = self.sc
        if sc.burst_s > 0 and self.t >= self.burst_until and self.rng.random() < 0.05:
            self.burst_until = self.t + float(self.rng.exponential(sc.burst_s))
        rate = sc.rate_rps * (sc.burst if self.t < self.burst_until else 1.0)
        self.t += float(self.rng.exponential(1.0 / rate))
        return _Request(self.t, sc.prompt.sample(self.rng), sc.output.sample(self.rng))


Admit = Callable[[float, list[_Request]], int]
"""(start time, waiting requests in order) → how many of them the next batch takes (≥ 1)."""


def batches(sc: Scenario, seed: int, admit: Admit | None = None) -> Iterator[Batch]:
    """(start time, requests) of each batch the server runs, forever: FCFS, up to max_batch,
    and no more than `admit` takes (the replica splits a batch far over its budget)."""
    rng = np.random.default_rng(seed)
    arrivals = _Arrivals(sc, rng)
    queue: deque[_Request] = deque()
    free_at = 0.0
    upcoming = arrivals.next()
    while True:
        if not queue:  # idle server: the next batch starts when a request arrives
            free_at = max(free_at, upcoming.arrival_s)
        while upcoming.arrival_s <= free_at:
            queue.append(upcoming)
            upcoming = arrivals.next()
        head = [queue[i] for i in range(min(sc.max_batch, len(queue)))]
        take = max(1, min(len(head), admit(free_at, head) if admit else len(head)))
        batch = [queue.popleft() for _ in range(take)]
        yield free_at, batch
        p = max(r.prompt for r in batch)
        s = max(r.prompt + r.output for r in batch)
        t0, cp, cd = sc.service_s
        free_at += t0 + cp * len(batch) * p + cd * (s - p)


def dense_bytes(config: Any, batch: int, seq: int, prefill: int, dtype: Any) -> int:
    """The dense model's bytes at (B, S, P) in the one byte accounting: weights + KV + the
    engine step that feeds the prompts (`rap.core.byte_table.predicted_bytes`)."""
    dense = memory.dense_mask(config)
    return byte_table.predicted_bytes(
        config, dense, batch, seq, dtype, include_activations=True, prefill_tokens=prefill
    )


def reference_bytes(sc: Scenario, config: Any, dtype: Any) -> int:
    """The dense model's bytes at (ref_batch, ref_seq): what m(t) = 1 gives the replica."""
    return dense_bytes(config, sc.ref_batch, sc.ref_seq, sc.ref_seq, dtype)


def situations(
    name: str, config: Any, dtype: Any, seed: int, count: int, max_over: float = MAX_OVER
) -> list[Situation]:
    """The first `count` batch starts of scenario `name` with seed `seed` (deterministic).

    A batch whose dense peak exceeds `max_over` × the budget at its start is split (admission,
    invariant 2 of docs/architecture.md): the longest FCFS prefix within it is taken, at least
    one request."""
    sc = get(name)
    if sc.grid is not None:
        return _grid_situations(sc, config, dtype, seed, count)
    ref = reference_bytes(sc, config, dtype)
    rng = np.random.default_rng(seed + 7_919)
    horizon = 4.0 * count / sc.rate_rps + 600.0
    grid = np.arange(0.0, horizon, 0.25)
    fracs = sc.memory.fractions(grid, rng)

    def budget_at(t: float) -> int:
        return int(fracs[min(int(t / 0.25), len(fracs) - 1)] * ref)

    def need(reqs: list[_Request]) -> int:
        s = max(r.prompt + r.output for r in reqs)
        p = max(r.prompt for r in reqs)
        return dense_bytes(config, len(reqs), s, p, dtype)

    def admit(t: float, head: list[_Request]) -> int:
        limit = max_over * budget_at(t)
        return next((k for k in range(len(head), 0, -1) if need(head[:k]) <= limit), 1)

    out: list[Situation] = []
    for t, reqs in batches(sc, seed, admit):
        s, p = max(r.prompt + r.output for r in reqs), max(r.prompt for r in reqs)
        out.append(Situation(t, len(reqs), s, p, budget_at(t), sc.name))
        if len(out) >= count:
            return out
    return out


def _grid_situations(
    sc: Scenario, config: Any, dtype: Any, seed: int, count: int
) -> list[Situation]:
    """Buckets of the controller's grid (a plan covers every bucket at the replica's budget, so
    the policy meets far bigger deficits there than in traffic) under random budgets."""
    assert sc.grid is not None
    batches_, seqs, lo, hi = sc.grid
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        b, s = int(rng.choice(batches_)), int(rng.choice(seqs))
        peak = dense_bytes(config, b, s, s, dtype)
        out.append(Situation(float(i), b, s, s, int(rng.uniform(lo, hi) * peak), sc.name))
    return out
