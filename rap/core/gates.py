"""Per-row skips inside one batched forward: a branch run on some positions only.

A serving step flattens every row's new tokens into one sequence (batch dimension 1). When rows
differ in which blocks they keep (a row admitted before a restore skips the restored layers:
its KV there does not exist), a kept block's branch must run on the positions of the rows that
use it and on no others:

    out[p] = branch(x[P])[p]   for p in P (the positions of the rows that use the block)
    out[p] = 0                 otherwise: the residual passes that point unchanged

Multiplying the branch by zero instead would still write KV the row does not own, waste the
compute, and (SDPA over a fully masked row) give NaN. `TokenGate` wraps the branch module by
composition for the duration of one forward (`gating`), in the place `DroppedBranch` takes for
a block dropped for everyone: where the residual is. Arguments that run along the sequence are
narrowed to P: tensors [1, T, ...] and [T], tuples of them (rotary cos/sin), and objects with a
`narrow_positions(P)` method (the serving step's paged KV, which keeps the rows in P).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rap.core.model import DroppedBranch

Block = tuple[str, int]


class TokenGate(nn.Module):
    """`branch` on the sequence positions `positions` (sorted), an exact zero elsewhere."""

    def __init__(self, branch: nn.Module, positions: torch.Tensor, returns_tuple: bool) -> None:
        super().__init__()
        self.branch = branch
        self.positions = positions
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seq = hidden_states.shape[1]
        if self.positions.numel() == 0:  # no row uses it this step: nothing runs
            zero = hidden_states.new_zeros(())
            return (zero, None) if self.returns_tuple else zero
        sub = hidden_states.index_select(1, self.positions)
        args = tuple(_narrow(a, self.positions, seq) for a in args)
        kwargs = {k: _narrow(v, self.positions, seq) for k, v in kwargs.items()}
        out = self.branch(sub, *args, **kwargs)
        part = out[0] if self.returns_tuple else out
        full = part.new_zeros((part.shape[0], seq, *part.shape[2:]))
        full.index_copy_(1, self.positions, part)
        return (full, *out[1:]) if self.returns_tuple else full


def _narrow(value: Any, positions: torch.Tensor, seq: int) -> Any:
    """`value` restricted to `positions` where it runs along the flat sequence (module doc)."""
    if hasattr(value, "narrow_positions"):
        return value.narrow_positions(positions)
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == seq:
            return value.index_select(1, positions.to(value.device))
        if value.dim() == 1 and value.shape[0] == seq:
            return value.index_select(0, positions.to(value.device))
        return value
    if isinstance(value, tuple | list):
        return type(value)(_narrow(v, positions, seq) for v in value)
    return value


@contextlib.contextmanager
def gating(model: Any, positions: dict[Block, torch.Tensor]) -> Iterator[None]:
    """Run each kept block in `positions` on those sequence positions only, for the block (one
    forward). Blocks the model has dropped for everyone stay dropped. The caller holds the
    model's mask (`PrunableModel.holding_mask`), so no switch happens meanwhile."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for (kind, layer), where in positions.items():
            module = model.spec.layers(model.hf)[layer]
            name = model.spec.block_parts(kind)[-1]
            branch = getattr(module, name)
            if isinstance(branch, DroppedBranch):
                continue
            swapped.append((module, name, branch))
            setattr(module, name, TokenGate(branch, where, returns_tuple=kind == "attn"))
        yield
    finally:
        for module, name, branch in swapped:
            setattr(module, name, branch)
