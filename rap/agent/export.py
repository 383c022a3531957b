"""Exporting a trained RLModule as a `rap.planning.policy_net.PolicyNet` (numpy, no RLlib).

The module doc of `rap.planning.policy_net` says what is exported and how it is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS
from ray.rllib.core.columns import Columns
from torch import nn

from rap.core.errors import RapError
from rap.planning.policy_net import PolicyNet


def _layers(path: list[Any]) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Linear layers and the activation after each, in forward order, from torch modules."""
    ws: list[np.ndarray] = []
    bs: list[np.ndarray] = []
    acts: list[str] = []
    for part in path:
        for m in part.modules():
            if isinstance(m, nn.Linear):
                ws.append(m.weight.detach().cpu().numpy().astype(np.float32))
                bias = m.bias if m.bias is not None else np.zeros(m.out_features)
                bs.append(
                    np.asarray(
                        bias.detach().cpu().numpy() if m.bias is not None else bias,
                        dtype=np.float32,
                    )
                )
                acts.append("linear")
            elif isinstance(m, nn.ReLU | nn.Tanh) and acts:
                acts[-1] = "relu" if isinstance(m, nn.ReLU) else "tanh"
            elif isinstance(m, nn.LayerNorm | nn.Dropout):
                raise RapError(f"cannot export a policy with {type(m).__name__} layers")
    return ws, bs, acts


def export_module(module: Any, algo: str, env: Any, meta: dict[str, Any], dest: Path) -> PolicyNet:
    """Export a PPO or DQN masked RLModule (module doc) to `dest`, checked on env samples."""
    path = (
        [module.encoder.actor_encoder, module.pi] if algo == "ppo" else [module.encoder, module.af]
    )
    net = PolicyNet(*_layers(path), meta=meta)
    obs, masks = sample_observations(env, 64)
    ref = module_outputs(module, algo, obs, masks)
    for i in range(len(obs)):
        want = int(np.argmax(np.where(masks[i] > 0.5, ref[i], -np.inf)))
        if net.act(obs[i], masks[i]) != want:
            raise RapError(f"exported network disagrees with the RLModule on sample {i}")
    net.save(dest)
    return net


def module_outputs(module: Any, algo: str, obs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The RLModule's own action outputs (PPO logits, DQN Q values) for a batch."""
    batch = {
        Columns.OBS: {"observations": torch.from_numpy(obs), "action_mask": torch.from_numpy(masks)}
    }
    with torch.no_grad():
        if algo == "ppo":
            out = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        else:
            out = module.compute_q_values(batch)[QF_PREDS]
    return np.asarray(out.numpy(), dtype=np.float64)


def sample_observations(env: Any, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` observations of random valid rollouts in `env` (observations, action masks)."""
    rng = np.random.default_rng(seed)
    obs_l: list[np.ndarray] = []
    mask_l: list[np.ndarray] = []
    o, _ = env.reset(seed=seed)
    while len(obs_l) < count:
        obs_l.append(o["observations"])
        mask_l.append(o["action_mask"])
        valid = np.flatnonzero(o["action_mask"][1:]) + 1
        o, _, done, trunc, _ = env.step(int(rng.choice(valid)) if len(valid) else 0)
        if done or trunc:
            o, _ = env.reset()
    return np.stack(obs_l).astype(np.float32), np.stack(mask_l).astype(np.float32)
