"""ServingSim: the paper's pruning MDP as a Gymnasium environment (`rap/ServingSim-v0`).

An episode is one decision: a batch of B sequences of S tokens (P of them prompt) must run under a
budget of `budget` bytes (a `rap.agent.scenarios.Situation`, drawn from named scenarios), starting
from the dense model. Blocks are numbered j = 0..2L−1: attention of layer j for j < L, MLP of layer
j − L otherwise. Bytes are the memory model's predicted peak (`rap.core.memory`, activations of the
prompt included, as admission counts them): peak(m) = base + Σ_{kept j} bytes_j, where bytes_j is a
block's weights plus, for attention, its layer's KV cache at (B, S).

Action space: Discrete(1 + 2L); 0 = STOP, a ≥ 1 = remove block a − 1. Invalid actions are 0 in
`action_mask`: a block already removed; any removal once the quality floor `min_kept_fraction`
is reached; and, while over budget, every removal after which the removals the floor still
allows (d of them) cannot reach the budget. Block j is feasible iff
    bytes_j + (the d − 1 largest other kept bytes) ≥ (peak − budget)
so from a situation that can fit, the agent can always still fit (with no floor, d = all blocks
and this masks nothing). Where nothing can fit, every kept block stays valid. STOP is always
valid (Gymnasium's contract: any action of the space may be sampled); ending over budget costs
the penalty.

Observation space: Dict(`action_mask`: Box{0,1}^(1+2L), `observations`: Box[0, 4]^(6+6L)):
    [log2 B / 6, log2 S / 12, budget / D, peak / D, (peak − budget)⁺ / D · 5, base / D,
     importance_j (rank of the stored score of block j among all 2L, / (2L−1), higher = more
     important; `rap.core.scores.find_scores`, never recomputed here),
     kept_j (the current mask), min(bytes_j / (peak − budget)⁺, 2) · kept_j]
with D = dense peak at (B, S, P). The same features serve the policy at serving time
(`Observer`, used by `rap.planning.policy.RapPolicy`).

Reward (the paper's Σ_i a_i(α·R_ppl_i − β·R_mem_i)), for removal step i turning m_{i−1} into m_i:
    R_ppl_i = −(q(m_i) − q(m_{i−1}))           quality kept: q = ln perplexity of the real model
    R_mem_i = (peak(m_i) − budget)⁺ / D         memory still over budget after the step
    r_i = α·R_ppl_i − β·R_mem_i,  and −penalty on STOP (or no valid action) while over budget.
q is capped at ln V (V = vocabulary size: the ln perplexity of guessing uniformly; beyond it a
model is broken whatever the number): with the cap and penalty (20) > ln V − q(dense) + β·steps,
every mask that fits scores above ending over budget (why: docs/agent.md).
q comes from a `Quality`: by default `rap.planning.surrogate` fitted to perplexities of the
default model measured under a few hundred masks (`rap.importance.quality`), so it is traceable
to the real model; tests use an additive model of stored scores. Σ r telescopes to
−α·(q(final) − q(dense)) − β·Σ R_mem.

Episode end: terminated when the mask fits (peak ≤ budget; success), on STOP, or when no removal
is valid (both failures while over budget, with the penalty). `info` holds `fits`, `lnppl`,
`peak_bytes`, `budget_bytes` and the mask. Only situations that need pruning and that the floor
allows to fit are drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from rap.agent import scenarios, workloads
from rap.core.errors import RapError
from rap.core.loading import load_config
from rap.planning.features import OBS_MAX, STOP, Observer, stored_importance
from rap.planning.surrogate import load_surrogate

ENV_ID = "rap/ServingSim-v0"


class Quality(Protocol):
    """ln perplexity of the model with the blocks marked in `dropped` (length 2L) removed."""

    def lnppl(self, dropped: np.ndarray) -> float: ...


@dataclass(frozen=True)
class AdditiveQuality:
    """q(m) = base + Σ_j cost_j · dropped_j (e.g. from stored one-shot or GSI scores)."""

    costs: tuple[float, ...]
    base: float = 0.0

    def lnppl(self, dropped: np.ndarray) -> float:
        return self.base + float(np.dot(np.asarray(self.costs), dropped))


class ServingSimEnv(gym.Env[dict[str, np.ndarray], int]):
    """The pruning MDP over workload situations (module doc). `config` keys, all optional:
    model ("smollm2"), hf_config (a transformers config instead), dtype ("float16"),
    scenarios (names; default every `train` scenario), split, seed_base, pool_size,
    per_worker (R env runners split the scenarios), scores (stored score kind, "bi"),
    importance (2L floats instead), quality ("surrogate" (default), "additive" or a `Quality`),
    alpha (1), beta (0.05), penalty (20), min_kept_fraction (0)."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        cfg = dict(config or {})
        # RLlib passes an EnvContext (a dict with the env runner's index as an attribute).
        cfg.setdefault("worker_index", getattr(config, "worker_index", 0))
        self.cfg = cfg
        self.hf_config, self.model_id = _model(cfg)
        self.dtype = cfg.get("dtype", "float16")
        importance = cfg.get("importance")
        if importance is None:
            importance = stored_importance(self.model_id, cfg.get("scores", "bi"))
        self.importance = np.asarray(importance, dtype=np.float64)
        self.observer = Observer(
            self.hf_config, self.dtype, importance, cfg.get("min_kept_fraction", 0.0)
        )
        self.quality: Quality = _quality(
            cfg.get("quality", "surrogate"), self.model_id, np.asarray(importance, dtype=np.float64)
        )
        self.alpha, self.beta = cfg.get("alpha", 1.0), cfg.get("beta", 0.05)
        self.penalty = cfg.get("penalty", 20.0)
        self.q_cap = math.log(self.hf_config.vocab_size)  # module doc: why q is capped
        self.scenarios = _scenarios(cfg)
        self._pools: dict[str, list[scenarios.Situation]] = {}
        n = self.observer.n
        self.action_space = gym.spaces.Discrete(1 + n)
        self.observation_space = gym.spaces.Dict(
            {
                "action_mask": gym.spaces.Box(0.0, 1.0, (1 + n,), np.float32),
                "observations": gym.spaces.Box(0.0, OBS_MAX, (self.observer.dim,), np.float32),
            }
        )
        self.situation: scenarios.Situation | None = None

    # -- situations ---------------------------------------------------------------------------
    def _pool(self, name: str) -> list[scenarios.Situation]:
        """Situations of one scenario that need pruning and can fit under the floor."""
        if name not in self._pools:
            seed = int(self.cfg.get("seed_base", 0)) + 31 * _stable_hash(name)
            count = int(self.cfg.get("pool_size", 400))
            sits = workloads.situations(name, self.hf_config, self.dtype, seed, count)
            self._pools[name] = [s for s in sits if self.needs_pruning(s) and self.feasible(s)]
            if not self._pools[name]:
                raise RapError(f"scenario {name!r} yields no situation that needs pruning")
        return self._pools[name]

    def needs_pruning(self, s: scenarios.Situation) -> bool:
        base, sizes = self.observer.table(s.batch, s.seq, s.prefill)
        return base + sizes.sum() > s.budget_bytes

    def feasible(self, s: scenarios.Situation) -> bool:
        """Whether the largest allowed drops reach the budget (else no mask fits at all)."""
        base, sizes = self.observer.table(s.batch, s.seq, s.prefill)
        keep = np.sort(sizes)[: self.observer.n - self.observer.max_drops]
        return base + keep.sum() <= s.budget_bytes

    # -- the MDP ------------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start from the dense model in a situation: `options["situation"]`, else one drawn."""
        super().reset(seed=seed)
        s = (options or {}).get("situation")
        if s is None:
            name = self.scenarios[int(self.np_random.integers(len(self.scenarios)))]
            pool = self._pool(name)
            s = pool[int(self.np_random.integers(len(pool)))]
        self.situation = s
        self.base, self.sizes = self.observer.table(s.batch, s.seq, s.prefill)
        self.kept = np.ones(self.observer.n, dtype=np.float32)
        self.q = self.lnppl()
        self.dense_bytes = self.base + float(self.sizes.sum())
        return self._obs(), self._info()

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply STOP or one removal; see the module doc for reward and episode end."""
        assert self.situation is not None, "call reset() first"
        a = int(action)
        valid = self._obs()["action_mask"]
        if not 0 <= a < len(valid) or valid[a] == 0:
            raise RapError(f"action {a} is masked out", expected="an action whose mask is 1")
        if a == STOP:
            fits = self.peak() <= self.situation.budget_bytes
            return self._obs(), 0.0 if fits else -self.penalty, True, False, self._info()
        self.kept[a - 1] = 0.0
        q = self.lnppl()
        over = max(self.peak() - self.situation.budget_bytes, 0) / self.dense_bytes
        reward = self.alpha * -(q - self.q) - self.beta * over
        self.q = q
        fits = over == 0
        stuck = not fits and self._obs()["action_mask"][1:].sum() == 0
        if stuck:
            reward -= self.penalty
        return self._obs(), float(reward), fits or stuck, False, self._info()

    def lnppl(self) -> float:
        """q of the current mask, capped at ln V (module doc)."""
        return min(self.quality.lnppl(1.0 - self.kept), self.q_cap)

    def peak(self) -> int:
        return int(self.base + self.sizes @ self.kept)

    def _obs(self) -> dict[str, np.ndarray]:
        s = self.situation
        assert s is not None
        return self.observer.observe(
            s.batch, s.seq, s.budget_bytes, self.base, self.sizes, self.kept
        )

    def _info(self) -> dict[str, Any]:
        s = self.situation
        assert s is not None
        return {
            "fits": self.peak() <= s.budget_bytes,
            "lnppl": self.q,
            "scenario": s.scenario,
            "peak_bytes": self.peak(),
            "budget_bytes": s.budget_bytes,
            "kept": self.kept.copy(),
        }


def _stable_hash(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 100_003


def _model(cfg: dict[str, Any]) -> tuple[Any, str]:
    if cfg.get("hf_config") is not None:
        return cfg["hf_config"], str(cfg.get("model_id", "tiny"))

    return load_config(cfg.get("model", "smollm2"))


def _scenarios(cfg: dict[str, Any]) -> list[str]:
    """The scenario names this env draws from. With `per_worker` = R (the number of RLlib env
    runners), runner k ≥ 1 (its EnvContext's worker_index) takes names[k − 1 :: R]: the runners
    split the scenarios between them and sample them in parallel."""
    names = list(cfg.get("scenarios") or scenarios.names(cfg.get("split", "train")))
    for n in names:
        scenarios.get(n)
    runners, worker = int(cfg.get("per_worker") or 0), int(cfg.get("worker_index") or 0)
    if runners > 0 and worker >= 1:
        return names[(worker - 1) % runners :: runners] or names
    return names


def _quality(spec: Any, model_id: str, importance: np.ndarray) -> Quality:
    """A `Quality` object as given; "surrogate": the model's shipped surrogate; "additive":
    q = Σ dropped importance (stored scores, shifted to ≥ 0: a stand-in for tests and smoke
    runs of models without measurements)."""
    if not isinstance(spec, str):
        return spec  # type: ignore[no-any-return]
    if spec == "additive":
        return AdditiveQuality(tuple(importance - min(importance.min(), 0.0)))
    if spec == "surrogate":
        return load_surrogate(model_id)
    raise RapError(f"unknown quality {spec!r}", expected='"surrogate", "additive" or a Quality')


def register() -> None:
    """Register `rap/ServingSim-v0` with Gymnasium (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="rap.agent.env:ServingSimEnv")


register()
