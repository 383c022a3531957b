"""Negative log-likelihood of token chunks under keep-masks, fast enough for greedy search.

For chunks of T tokens x_1..x_T the loss of a mask is

    NLL(mask) = Σ_chunks Σ_{t=1}^{T-1} −log p_mask(x_{t+1} | x_≤t)      (nats)
    perplexity = exp(NLL / (chunks · (T − 1)))

Masks are applied with `PrunableModel.apply` and each forward runs with `use_cache=False`.

Why it is fast: a mask that differs from a base mask only in layers ≥ l computes exactly the
same residual stream as the base up to layer l's input. So the evaluator can *capture* every
layer's input under the base mask once, and then run a candidate *from layer l*: layers before l
are swapped for stand-ins (the one just before l replays the captured tensor) and only layers
l..L−1, the final norm and the head are computed. A candidate's run can capture the inputs of the
layers after l in passing, so the next base state costs no extra forward pass. Chunks run in
batches; a run can stop early once its partial sum passes a bound (NLL terms are ≥ 0, so a
partial sum above the best total can never win).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rap.core.masks import KeepMask
from rap.core.model import PrunableModel

States = dict[int, dict[int, torch.Tensor]]
"""layer → batch index → the residual stream entering that layer, [batch, T, H]."""


class _StandIn(nn.Module):
    """Replaces a decoder layer that a run starts after: passes its input through, or (for the
    layer just before the start) returns the captured input of the start layer."""

    def __init__(self, original: nn.Module, value: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.value = value
        self.as_tuple = as_tuple
        # Some models read per-layer attributes in their loop (e.g. the attention type).
        for attr in ("attention_type", "is_sliding", "layer_idx"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


@dataclass
class RunResult:
    """Per-chunk NLL sums of the batches a run covered, and the states it captured."""

    chunk_nll: dict[int, torch.Tensor] = field(default_factory=dict)
    captured: States = field(default_factory=dict)
    stopped: bool = False

    @property
    def total(self) -> float:
        return float(sum(float(v.sum()) for v in self.chunk_nll.values()))


class NllEvaluator:
    """Evaluates masks on fixed token chunks; counts the forward work it does."""

    def __init__(self, model: PrunableModel, ids: torch.Tensor, batch_size: int = 4) -> None:
        self.model = model
        self.ids = ids.to(model.device)
        self.batches: list[torch.Tensor] = list(self.ids.split(batch_size))
        self.layers: Any = model.spec.layers(model.hf)
        self.predicted = ids.shape[0] * (ids.shape[1] - 1)
        self.runs = 0
        self.layer_batches = 0
        """Decoder-layer passes over one batch: the work done, in units of one layer."""
        self._as_tuple: bool | None = None

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def perplexity(self, total_nll: float) -> float:
        return math.exp(total_nll / self.predicted)

    def full_equivalents(self) -> float:
        """Work done so far in units of one full evaluation (all layers, all batches)."""
        return self.layer_batches / (self.model.num_layers * self.num_batches)

    def run(
        self,
        mask: KeepMask,
        start: int = 0,
        states: States | None = None,
        batches: Sequence[int] | None = None,
        capture: bool = False,
        bound: float = math.inf,
    ) -> RunResult:
        """NLL of `mask` on `batches` (all by default), computing layers ≥ `start` only.

        `states[start]` must hold the stream entering layer `start` under a mask equal to
        `mask` below `start`. With `capture`, the inputs of layers > start are kept. The run stops
        (`stopped=True`) once its partial sum exceeds `bound`.
        """
        if start > 0 and (states is None or start not in states):
            raise ValueError(f"a run from layer {start} needs the captured states of that layer")
        self.model.apply(mask)
        self.runs += 1
        out = RunResult()
        for b in range(self.num_batches) if batches is None else batches:
            replay = states[start][b] if states is not None and start > 0 else None
            with (
                torch.inference_mode(),
                self._swapped(start, replay),
                self._capturing(out.captured if capture else None, start, b),
            ):
                logits = self.model.hf(input_ids=self.batches[b], use_cache=False).logits
            out.chunk_nll[b] = _chunk_nll(logits, self.batches[b])
            self.layer_batches += self.model.num_layers - start
            if out.total > bound:
                out.stopped = True
                break
        return out

    def capture_all(self, mask: KeepMask) -> tuple[States, RunResult]:
        """Run `mask` from the embeddings, keeping every layer's input: the base states."""
        res = self.run(mask, capture=True)
        return res.captured, res

    @contextmanager
    def _swapped(self, start: int, replay: torch.Tensor | None) -> Iterator[None]:
        if start == 0:
            yield
            return
        as_tuple = self._output_is_tuple()
        originals = [self.layers[i] for i in range(start)]
        try:
            for i in range(start):
                value = replay if i == start - 1 else None
                self.layers[i] = _StandIn(originals[i], value, as_tuple)
            yield
        finally:
            for i, module in enumerate(originals):
                self.layers[i] = module

    @contextmanager
    def _capturing(self, into: States | None, start: int, b: int) -> Iterator[None]:
        if into is None:
            yield
            return

        def hook(index: int) -> Any:
            def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                into.setdefault(index, {})[b] = x.detach().clone()

            return pre

        handles = [
            self.layers[i].register_forward_pre_hook(hook(i), with_kwargs=True)
            for i in range(start + 1, self.model.num_layers)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _output_is_tuple(self) -> bool:
        """Whether decoder layers return a tuple (older transformers) or a tensor (5.x)."""
        if self._as_tuple is None:
            seen: list[bool] = []
            handle = self.layers[0].register_forward_hook(
                lambda _m, _a, out: seen.append(isinstance(out, tuple))
            )
            try:
                with torch.inference_mode():
                    self.model.hf(input_ids=self.batches[0][:1, :2], use_cache=False)
            finally:
                handle.remove()
            self._as_tuple = bool(seen and seen[0])
        return self._as_tuple


def _chunk_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ_t −log p(x_{t+1} | x_≤t) per chunk, in float32: [batch]."""
    pred = logits[:, :-1].float()
    target = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none"
    )
    return nll.view(target.shape).sum(dim=1).cpu()
