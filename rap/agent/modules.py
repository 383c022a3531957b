"""RLlib RLModules (new API stack) that respect the env's action mask: PPO and DQN.

Both read a Dict observation `{"action_mask": m ∈ {0,1}^A, "observations": x}` (`rap.agent.env`),
build their networks on x alone, and make masked actions impossible:

    PPO   logits'_a = logits_a + max(ln m_a, FLOAT_MIN)     (RLlib's action-masking example;
          a finite floor, because a categorical over −inf logits gives NaN entropies)
    DQN   Q'(s, a) = Q(s, a) if m_a = 1 else −inf          exactly −inf, applied after the
          dueling combination Q = V + A − mean(A), for observations and next observations alike
          (the same helper computes both): DQN's learner turns −inf into 0 only after gathering
          the chosen or best action, its epsilon-random exploration samples among actions whose
          Q is finite, and argmax never picks a masked action, so the TD target
          r + γ·max_{a'} Q'(s', a') only ranges over valid next actions.

Imported only by training (`rllib_configs/`) and when a checkpoint is restored with RLlib;
serving runs the exported plain-torch network (`rap.planning.policy_net`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS
from ray.rllib.algorithms.dqn.torch.default_dqn_torch_rl_module import DefaultDQNTorchRLModule
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.utils.torch_utils import FLOAT_MIN

MASK_KEY, OBS_KEY = "action_mask", "observations"


def _inner_space(observation_space: Any) -> Any:
    """The space the networks see: the Dict's `observations` entry."""
    if (
        not isinstance(observation_space, gym.spaces.Dict)
        or MASK_KEY not in observation_space.spaces
    ):
        raise ValueError(
            "masked RLModules need a Dict observation space with keys 'action_mask' and "
            f"'observations', got {observation_space}"
        )
    return observation_space[OBS_KEY]


def split_obs(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(action mask, a shallow copy of `batch` whose OBS is the bare observations): the
    learner's batch is never mutated, because RLlib reuses it (next observations, metrics)."""
    obs = batch[Columns.OBS]
    out = dict(batch)
    out[Columns.OBS] = obs[OBS_KEY]
    return obs[MASK_KEY], out


class MaskedPPOTorchRLModule(DefaultPPOTorchRLModule):
    """PPO whose action logits are masked (module doc); the value function sees x only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.observation_space_with_mask = kwargs["observation_space"]
        kwargs["observation_space"] = _inner_space(kwargs["observation_space"])
        super().__init__(*args, **kwargs)

    def setup(self) -> None:
        super().setup()
        # Env runners check observations against this space: keep the Dict outside.
        self.observation_space = self.observation_space_with_mask

    def _masked(self, outs: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
        outs[Columns.ACTION_DIST_INPUTS] = outs[Columns.ACTION_DIST_INPUTS] + torch.clamp(
            torch.log(mask), min=FLOAT_MIN
        )
        return outs

    def _forward_inference(self, batch: dict[str, Any], **kw: Any) -> dict[str, Any]:
        mask, inner = split_obs(batch)
        return self._masked(super()._forward_inference(inner, **kw), mask)

    def _forward_exploration(self, batch: dict[str, Any], **kw: Any) -> dict[str, Any]:
        mask, inner = split_obs(batch)
        return self._masked(super()._forward_exploration(inner, **kw), mask)

    def _forward_train(self, batch: dict[str, Any], **kw: Any) -> dict[str, Any]:
        mask, inner = split_obs(batch)
        return self._masked(super()._forward_train(inner, **kw), mask)

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> Any:
        if isinstance(batch[Columns.OBS], dict):
            _, batch = split_obs(batch)
        return super().compute_values(batch, embeddings)


class MaskedDQNTorchRLModule(DefaultDQNTorchRLModule):
    """DQN (dueling, double Q as configured) with −inf on masked actions (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.observation_space_with_mask = kwargs["observation_space"]
        kwargs["observation_space"] = _inner_space(kwargs["observation_space"])
        super().__init__(*args, **kwargs)

    def setup(self) -> None:
        super().setup()
        self.observation_space = self.observation_space_with_mask

    def _qf_forward_helper(self, batch: dict[str, Any], encoder: Any, head: Any) -> dict[str, Any]:
        """Every Q computation (online, target; observations and next observations, which
        `_forward_train` concatenates into one batch for double Q) passes here."""
        mask, inner = split_obs(batch)
        out: dict[str, Any] = super()._qf_forward_helper(inner, encoder, head)
        neg_inf = torch.full_like(out[QF_PREDS], float("-inf"))
        out[QF_PREDS] = torch.where(mask > 0.5, out[QF_PREDS], neg_inf)
        return out
