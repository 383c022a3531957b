"""The trained policy as a plain network: an MLP evaluated with numpy, no RLlib at serving time.

Export (`rap.agent.export.export_module`) takes the RLModule's action path — PPO: actor encoder then
pi head (logits); DQN: encoder then advantage head A(s, ·) — as its sequence of Linear layers and
activations, and writes `policy.safetensors` (w0, b0, w1, b1, ...) and `rap-policy.json` (format,
activations, sizes, and what the policy was trained for). Greedy choice is the same for both:

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
from safetensors.numpy import load_file, save_file

from rap.core.errors import RapError

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

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"w{i}": w for i, w in enumerate(self.weights)}
        tensors.update({f"b{i}": b for i, b in enumerate(self.biases)})
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
            str(folder / WEIGHTS_FILE),
        )
        doc = {
            "format": FORMAT,
            "activations": self.activations,
            "obs_dim": self.obs_dim,
            "num_actions": self.num_actions,
            "num_params": self.num_params,
            **self.meta,
        }
        (folder / META_FILE).write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> PolicyNet:
        """Read an exported policy folder; `RapError` naming what is missing or wrong."""

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
        return cls(
            [t[f"w{i}"] for i in range(k)],
            [t[f"b{i}"] for i in range(k)],
            list(doc["activations"]),
            meta,
        )
