"""The trained policy as a plain network: an MLP evaluated with numpy, no RLlib at serving time.

Export (`export_module`) takes the RLModule's action path — PPO: actor encoder then pi head
(logits); DQN: encoder then advantage head A(s, ·) — as its sequence of Linear layers and
activations, and writes `policy.safetensors` (w0, b0, w1, b1, ...) and `rap-policy.json`
(format, activations, sizes, and what the policy was trained for). Greedy choice is the same
for both:

    a* = argmax_a  out(x)_a  over actions with mask_a = 1

(for dueling DQN, Q = V + A − mean A, so argmax Q = argmax A). The export is checked against
the module's own forward pass on observations drawn from the env: the masked argmax must agree
on every one, else the export fails. A tiny MLP in numpy takes a few microseconds a call, far
below torch's per-call overhead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rap.errors import RapError

FORMAT = "rap-policy/1"
META_FILE = "rap-policy.json"
WEIGHTS_FILE = "policy.safetensors"
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "linear": lambda x: x,
}


@dataclass
class PolicyNet:
    """y = f_k(W_k … f_1(W_1 x + b_1) … + b_k), f the layers' activations."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activations: list[str]
    meta: dict[str, Any]

    @property
    def obs_dim(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def num_actions(self) -> int:
        return int(self.weights[-1].shape[0])

    @property
    def num_params(self) -> int:
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases, strict=True))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Outputs (logits or advantages) for observations x: [..., obs_dim] → [..., A]."""
        h = x.astype(np.float32, copy=False)
        for w, b, act in zip(self.weights, self.biases, self.activations, strict=True):
            h = ACTIVATIONS[act](h @ w.T + b)
        return h

    def act(self, obs: np.ndarray, mask: np.ndarray) -> int:
        """The greedy valid action: argmax of the outputs where mask = 1."""
        out = self.forward(obs)
        return int(np.argmax(np.where(mask > 0.5, out, -np.inf)))

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"w{i}": w for i, w in enumerate(self.weights)}
        tensors.update({f"b{i}": b for i, b in enumerate(self.biases)})
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                  str(folder / WEIGHTS_FILE))  # fmt: skip
        doc = {"format": FORMAT, "activations": self.activations, "obs_dim": self.obs_dim,
               "num_actions": self.num_actions, "num_params": self.num_params,
               **self.meta}  # fmt: skip
        (folder / META_FILE).write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> PolicyNet:
        """Read an exported policy folder; `RapError` naming what is missing or wrong."""
        from safetensors.numpy import load_file

        f = Path(folder)
        if not (f / META_FILE).is_file() or not (f / WEIGHTS_FILE).is_file():
            raise RapError(
                f"{f} is not an exported RAP policy",
                expected=f"a folder with {META_FILE} and {WEIGHTS_FILE} (written by `rap train`)",
            )
        doc = json.loads((f / META_FILE).read_text())
        if doc.get("format") != FORMAT:
            raise RapError(f"{f / META_FILE} has format {doc.get('format')!r}", expected=FORMAT)
        t = load_file(str(f / WEIGHTS_FILE))
        k = len(doc["activations"])
        meta = {key: v for key, v in doc.items() if key not in ("format", "activations")}
        return cls([t[f"w{i}"] for i in range(k)], [t[f"b{i}"] for i in range(k)],
                   list(doc["activations"]), meta)  # fmt: skip


def _layers(path: list[Any]) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Linear layers and the activation after each, in forward order, from torch modules."""
    from torch import nn

    ws: list[np.ndarray] = []
    bs: list[np.ndarray] = []
    acts: list[str] = []
    for part in path:
        for m in part.modules():
            if isinstance(m, nn.Linear):
                ws.append(m.weight.detach().cpu().numpy().astype(np.float32))
                bias = m.bias if m.bias is not None else np.zeros(m.out_features)
                bs.append(np.asarray(bias.detach().cpu().numpy() if m.bias is not None else bias,
                                     dtype=np.float32))  # fmt: skip
                acts.append("linear")
            elif isinstance(m, nn.ReLU | nn.Tanh) and acts:
                acts[-1] = "relu" if isinstance(m, nn.ReLU) else "tanh"
            elif isinstance(m, nn.LayerNorm | nn.Dropout):
                raise RapError(f"cannot export a policy with {type(m).__name__} layers")
    return ws, bs, acts


def export_module(module: Any, algo: str, env: Any, meta: dict[str, Any], dest: Path) -> PolicyNet:
    """Export a PPO or DQN masked RLModule (module doc) to `dest`, checked on env samples."""
    path = [module.encoder.actor_encoder, module.pi] if algo == "ppo" else [module.encoder,
                                                                           module.af]  # fmt: skip
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
    import torch
    from ray.rllib.core.columns import Columns

    batch = {Columns.OBS: {"observations": torch.from_numpy(obs),
                           "action_mask": torch.from_numpy(masks)}}  # fmt: skip
    with torch.no_grad():
        if algo == "ppo":
            out = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        else:
            from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS

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
