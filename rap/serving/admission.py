"""Admission: which requests start now, under which mask (DESIGN.md invariants 2 and 6).

A batch of B rows, padded to P prompt tokens and running to S = P + max_tokens, starts only if

    peak(mask, B, S, P) = weights(mask) + kv(mask, B, S) + max(activations(B, P), kv_growth)
                        ≤ budget

under the mask it will run, and that mask keeps at least the quality floor. Masks are tried in
order: the controller's plan entry for the batch's bucket, the dense model, then a local fallback
planned on the spot. If none fits, the batch is split (fewer rows now, the rest stay queued);
if a single request fits under no allowed mask, it is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rap.core import memory
from rap.core.constants import MIB
from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, MaskVersion, max_drops
from rap.planning import MaskPlanner
from rap.serving.messages import MaskPlan


@dataclass(frozen=True)
class Shape:
    """A batch's shape: rows, padded prompt length, whole length (prompt + max new tokens)."""

    batch: int
    prefill: int
    seq: int

    @classmethod
    def of(cls, prompt_lens: Sequence[int], max_tokens: Sequence[int]) -> Shape:
        prefill = max(prompt_lens)
        return cls(len(prompt_lens), prefill, prefill + max(max_tokens))


@dataclass(frozen=True)
class Admission:
    """The decision for the first `rows` waiting requests."""

    rows: int
    mask: KeepMask
    peak_bytes: int
    kv_reserved_bytes: int
    reason: str


@dataclass(frozen=True)
class Refusal:
    """The head request fits under no allowed mask: answer 503 with this reason."""

    reason: str
    needed_bytes: int


def peak_of(config: Any, mask: KeepMask, shape: Shape, dtype: Any) -> int:
    return memory.peak_bytes(
        config, mask, shape.batch, shape.seq, dtype, prefill_tokens=shape.prefill
    )


def above_floor(mask: KeepMask, min_kept_fraction: float) -> bool:
    return mask.kept_fraction >= min_kept_fraction


class Admitter:
    """Chooses rows and a mask for the next batch; pure logic over the memory model."""

    def __init__(
        self,
        config: Any,
        model_id: str,
        dtype: Any,
        planner: MaskPlanner | None,
        min_kept_fraction: float,
    ) -> None:
        self.config = config
        self.model_id = model_id
        self.dtype = dtype
        self.planner = planner
        self.min_kept_fraction = min_kept_fraction
        self.num_layers = memory.dims_of(config).num_layers

    def candidates(
        self, plan: MaskPlan | None, shape: Shape, budget: int, version: MaskVersion
    ) -> list[KeepMask]:
        """Masks to try, best first: the controller's, the dense model, a local fallback."""
        out: list[KeepMask] = []
        entry = plan.entry_for(shape.batch, shape.seq) if plan else None
        if entry is not None:
            out.append(entry.mask)
        out.append(KeepMask.dense(self.model_id, self.num_layers, source="local", version=version))
        if self.planner is not None:
            try:
                planned = self.planner.plan(budget, shape.batch, shape.seq, shape.prefill)
                out.append(planned.model_copy(update={"source": "local", "version": version}))
            except BudgetError:
                pass  # nothing fits at this shape: the caller splits or refuses
        return out

    def admit(
        self,
        prompt_lens: Sequence[int],
        max_tokens: Sequence[int],
        plan: MaskPlan | None,
        budget: int,
        version: MaskVersion,
    ) -> Admission | Refusal:
        """Largest FIFO prefix of the waiting requests that fits, and its mask."""
        for rows in range(len(prompt_lens), 0, -1):
            shape = Shape.of(prompt_lens[:rows], max_tokens[:rows])
            for mask in self.candidates(plan, shape, budget, version):
                if not above_floor(mask, self.min_kept_fraction):
                    continue
                peak = peak_of(self.config, mask, shape, self.dtype)
                if peak <= budget:
                    split = f", split {rows}/{len(prompt_lens)}" if rows < len(prompt_lens) else ""
                    return Admission(
                        rows=rows,
                        mask=mask,
                        peak_bytes=peak,
                        kv_reserved_bytes=memory.kv_bytes(
                            self.config, mask, shape.batch, shape.seq, self.dtype
                        ),
                        reason=f"{mask.source} mask fits ({peak} <= {budget} bytes){split}",
                    )
        return self._refusal(prompt_lens[0], max_tokens[0], budget)

    def _refusal(self, prompt_len: int, max_tokens: int, budget: int) -> Refusal:
        shape = Shape.of([prompt_len], [max_tokens])
        needed = min(
            peak_of(self.config, mask, shape, self.dtype)
            for mask in _floor_masks(self.model_id, self.num_layers, self.min_kept_fraction)
        )
        return Refusal(
            reason=(
                f"not enough memory: a request of {shape.seq} tokens needs about "
                f"{needed / MIB:.1f} MiB with the fewest blocks allowed "
                f"({self.min_kept_fraction:.0%} kept); the budget is {budget / MIB:.1f} MiB"
            ),
            needed_bytes=needed,
        )


def _floor_masks(model_id: str, n: int, min_kept_fraction: float) -> list[KeepMask]:
    """Masks at the quality floor, one keeping attention blocks first, one MLP blocks first:
    the smaller of their peaks estimates what a request needs at the very least."""
    keep = 2 * n - max_drops(2 * n, min_kept_fraction)
    first, second = min(keep, n), max(0, keep - n)
    return [
        KeepMask(
            model=model_id, attn=tuple(i < a for i in range(n)), mlp=tuple(i < m for i in range(n))
        )
        for a, m in ((first, second), (second, first))
    ]
