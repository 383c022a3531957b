"""ServingSim: Gymnasium's checker, masking, episode end, reward sign, budgets at success."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rap.agent.env import ENV_ID, AdditiveQuality, ServingSimEnv
from rap.agent.scenarios import Situation
from rap.core.errors import RapError
from rap.planning.features import STOP, importance_ranks
from tests.tiny import tiny_config

L = 4
N = 2 * L


def make(**kw) -> ServingSimEnv:
    config = {
        "hf_config": tiny_config("llama"),
        "importance": list(np.arange(N, 0.0, -1.0)),
        "quality": AdditiveQuality(tuple(np.linspace(0.1, 0.8, N)), base=2.0),
        "scenarios": ["chat-steady", "chat-steps"],
        "pool_size": 80,
        **kw,
    }
    return ServingSimEnv(config)


def tight_situation(env: ServingSimEnv, blocks_needed: int) -> Situation:
    """A situation whose budget needs about `blocks_needed` of the largest blocks removed."""
    base, sizes = env.observer.table(4, 512, 256)
    biggest = np.sort(sizes)[::-1]
    budget = int(base + sizes.sum() - biggest[:blocks_needed].sum() + 1)
    return Situation(0.0, 4, 512, 256, budget, "test")


def test_check_env_passes_and_id_is_registered() -> None:
    assert ENV_ID in gym.registry
    env = gym.make(
        ENV_ID,
        config={
            "hf_config": tiny_config("llama"),
            "quality": "additive",
            "importance": list(range(N)),
            "scenarios": ["chat-steady"],
            "pool_size": 60,
        },
    )
    check_env(env.unwrapped)
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)


def test_spaces_match_the_docstring() -> None:
    env = make()
    assert isinstance(env.action_space, gym.spaces.Discrete)
    assert isinstance(env.observation_space, gym.spaces.Dict)
    assert env.action_space.n == 1 + N
    assert env.observation_space["observations"].shape == (6 + 3 * N,)
    assert env.observation_space["action_mask"].shape == (1 + N,)


def test_removed_blocks_are_masked_and_masked_actions_refused() -> None:
    env = make()
    obs, _ = env.reset(seed=0, options={"situation": tight_situation(env, 3)})
    assert obs["action_mask"].tolist() == [1.0] * (1 + N)
    obs, _, done, _, _ = env.step(3)
    assert not done
    assert obs["action_mask"][3] == 0 and obs["action_mask"][STOP] == 1
    kept = obs["observations"][6 + N : 6 + 2 * N]
    assert kept[2] == 0 and kept.sum() == N - 1
    with pytest.raises(RapError, match="masked"):
        env.step(3)


def test_floor_masks_every_removal_once_reached() -> None:
    env = make(min_kept_fraction=0.75)  # at most 2 of 8 blocks may go
    env.reset(seed=0, options={"situation": tight_situation(env, 6)})
    env.step(1)
    _, r, done, _, info = env.step(2)
    assert done and not info["fits"]  # stuck over budget: a failure
    assert r < -env.penalty  # the quality cost of the step and the penalty


def test_episode_ends_when_it_fits_and_fits_means_within_budget() -> None:
    env = make()
    rng = np.random.default_rng(0)
    for ep in range(40):
        obs, _ = env.reset(seed=ep)
        done, info = False, dict[str, Any]()
        while not done:
            valid = np.flatnonzero(obs["action_mask"][1:]) + 1
            obs, _, done, trunc, info = env.step(int(rng.choice(valid)))
            assert not trunc
        assert info["fits"]
        assert info["peak_bytes"] <= info["budget_bytes"]


def test_removal_rewards_are_quality_costs_and_stop_over_budget_is_penalised() -> None:
    env = make(beta=0.0)
    env.reset(seed=0, options={"situation": tight_situation(env, 3)})
    _, r, _, _, info = env.step(1)
    assert r == pytest.approx(-0.1)  # −α·Δq with Δq = cost of block 0
    assert r < 0 and info["lnppl"] == pytest.approx(2.1)
    _, r, done, _, info = env.step(STOP)
    assert done and not info["fits"] and r == -env.penalty


def test_memory_term_rewards_fitting_sooner() -> None:
    env = make(alpha=0.0, beta=1.0)
    env.reset(seed=0, options={"situation": tight_situation(env, 3)})
    _, r, _, _, _ = env.step(1)
    assert r < 0  # still over budget: −β·(peak − budget)/D


def test_importance_ranks_scale_to_unit_interval() -> None:
    r = importance_ranks([0.3, 0.1, 0.2, 0.9])
    assert r.tolist() == pytest.approx([2 / 3, 0.0, 1 / 3, 1.0])


def test_env_runners_split_scenarios() -> None:
    names = ["chat-steady", "chat-steps", "mixed-burst"]
    first = make(scenarios=names, per_worker=2, worker_index=1)
    second = make(scenarios=names, per_worker=2, worker_index=2)
    assert first.scenarios == ["chat-steady", "mixed-burst"]
    assert second.scenarios == ["chat-steps"]
    assert make(scenarios=names, per_worker=2).scenarios == names  # the local runner: all


def test_fitting_a_huge_deficit_beats_stopping_over_budget() -> None:
    """A controller bucket (8 × 2,048, prompt activations) under a budget that only ~all drops
    meet: the shipped surrogate prices such masks at 100+ nats, and before q was capped at ln V
    STOP (−penalty) scored higher, so the trained policy stopped and fell back."""
    env = ServingSimEnv(
        {"model": "smollm2", "scores": "oneshot", "scenarios": ["bucket-grid"], "pool_size": 20}
    )
    base, sizes = env.observer.table(8, 2048, 2048)
    keep = np.argsort(sizes)[: env.observer.n - env.observer.max_drops]
    budget = int(base + sizes[keep].sum() + 8 * 2**20)
    env.reset(options={"situation": Situation(0.0, 8, 2048, 2048, budget, "test")})
    total, done, info = 0.0, False, {}
    for j in np.argsort(sizes)[::-1]:  # biggest blocks first until the mask fits
        _, r, done, _, info = env.step(int(j) + 1)
        total += r
        if done:
            break
    assert info["fits"]
    assert -env.penalty < total < -1.0  # a broken model, but better than ending over budget
