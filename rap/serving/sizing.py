"""How a replica sizes itself: the mask and the KV pool a budget allows (no state of its own).

The dense model while its pool holds a full batch (`max_batch_size` rows × `target_seq` tokens),
else the controller's plan entry for that bucket, else the local planner's mask, never below the
quality floor; an operator's ceiling caps every candidate; the pool takes what the budget leaves:

    pages per kept attention layer = ⌊(budget − weights(mask) − step activations)
                                      / (kept attention layers · kv_page_bytes(P))⌋
"""

from __future__ import annotations

from typing import Any

from rap.core import memory
from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, MaskVersion
from rap.planning import MaskPlanner
from rap.serving.kv_pages import PagePool
from rap.serving.messages import MaskPlan


class Sizing:
    """Masks and pools for one model under one engine configuration (module doc)."""

    def __init__(self, model: Any, config: Any) -> None:
        self.model, self.config = model, config
        self.context_len = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)

    def row_tokens(self, pool: PagePool) -> int:
        """Most tokens (prompt + output) one row can hold in `pool`: capacity × page tokens
        when a kept layer attends fully; the context when every kept layer has a window (its
        pages are recycled) or no attention is kept."""
        if any(self.model.dims.windows[layer] is None for layer in pool.layers):
            return min(pool.capacity * pool.page_tokens, self.context_len)
        return self.context_len

    def choose(
        self,
        budget: int,
        plan: MaskPlan | None,
        ceiling: KeepMask | None,
        planner: MaskPlanner | None,
        version: MaskVersion,
        held_pages: int = 0,
    ) -> tuple[KeepMask, int]:
        """(mask, pages per layer): the dense model if its pool holds the whole batch (nothing
        is pruned while memory allows), else the controller's mask for the bucket if its pool
        holds a row of `target_seq` tokens, else the local planner's mask for the bucket, for
        one such row, or for one page (planning for smaller loads reaches smaller masks), else
        the dense model if one row fits; never below the quality floor. Each of them first
        only if its pool also holds the `held_pages` the running rows reserve (so that rows
        are preempted only when no allowed mask keeps them all)."""
        b, s = self.config.max_batch_size, self.config.target_seq
        floor = self.config.min_kept_fraction
        entry = plan.entry_for(b, s) if plan else None
        dense = entry.mask if entry and entry.mask.kept_fraction == 1.0 else self._dense(version)
        # The running rows' reservations as one long row: a mask that keeps them all.
        kept_rows = (1, held_pages * self.config.page_tokens) if held_pages else None
        shapes = [x for x in ((b, s), kept_rows, (1, s), (1, self.config.page_tokens)) if x]
        locals_ = [self._local(planner, budget, b_, s_, version) for b_, s_ in shapes]
        choices = [(dense, b), (entry.mask if entry else None, 1), *((m, 1) for m in locals_)]
        if ceiling is not None:
            choices = [(m.within(ceiling) if m else None, r) for m, r in choices]
            dense = choices[0][0] or dense
        for held in (held_pages, 0):
            for mask, rows in [*choices, (dense, 1)]:
                if mask is None or mask.kept_fraction < floor:
                    continue
                if self.rows(mask, budget) >= rows and self.pages(mask, budget) >= held:
                    return mask, self.pages(mask, budget)
        # Not even one row fits: the allowed mask with the fewest weight bytes, so that at least
        # the weights stay in budget; requests that need more pages get a 503 saying so.
        allowed = [m for m, _ in choices if m is not None and m.kept_fraction >= floor]
        cfg, dt = self.model.config, self.model.dtype
        mask = min([*allowed, dense], key=lambda m: memory.weight_bytes(cfg, m, dt))
        return mask, self.pages(mask, budget)

    def _local(
        self, planner: MaskPlanner | None, budget: int, batch: int, seq: int, version: MaskVersion
    ) -> KeepMask | None:
        if planner is None:
            return None
        try:
            planned = planner.plan(budget, batch, seq, self.config.max_step_tokens)
        except BudgetError:
            return None
        return planned.model_copy(update={"source": "local", "version": version})

    def rows(self, mask: KeepMask, budget: int) -> int:
        """Rows of `target_seq` tokens the pool left by `mask` holds."""
        c = self.config
        kept = [w for w, k in zip(self.model.dims.windows, mask.attn, strict=True) if k]
        if not kept:
            return int(c.max_batch_size)  # no attention kept: rows hold no pages
        per_row = max(
            memory.kv_row_pages(w, c.target_seq, c.page_tokens, c.max_step_tokens) for w in kept
        )
        return self.pages(mask, budget) // per_row

    def _dense(self, version: MaskVersion) -> KeepMask:
        m = self.model
        return KeepMask.dense(m.model_id, m.num_layers, source="local", version=version)

    def step_bytes(self) -> int:
        """One step's activations (`rap.core.memory.step_activation_bytes`)."""
        c = self.config
        return memory.step_activation_bytes(
            self.model.config, c.max_step_tokens, c.max_batch_size, self.model.dtype
        )

    def pages(self, mask: KeepMask, budget: int) -> int:
        """Pages per kept attention layer the budget leaves after weights and a step."""
        cfg, dt, c = self.model.config, self.model.dtype, self.config
        spare = budget - memory.weight_bytes(cfg, mask, dt) - self.step_bytes()
        page = max(sum(mask.attn), 1) * memory.kv_page_bytes(cfg, dt, c.page_tokens)
        return max(spare // page, 0)

    def bytes_with(self, mask: KeepMask, pages: int) -> int:
        """weights(mask) + a pool of `pages` pages per kept attention layer + one step."""
        cfg, dt = self.model.config, self.model.dtype
        pool = memory.kv_pool_bytes(cfg, mask, dt, self.config.page_tokens, pages)
        return memory.weight_bytes(cfg, mask, dt) + pool + self.step_bytes()

    def pool(self, mask: KeepMask | None, pages: int) -> PagePool:
        """Slabs for the mask's kept attention layers (none for None: between two pools)."""
        kept = [i for i, k in enumerate(mask.attn) if k] if mask is not None else []
        d = self.model.dims
        return PagePool(
            kept,
            pages,
            self.config.page_tokens,
            d.kv_heads,
            d.head_dim,
            self.model.dtype,
            self.model.device,
        )


def engine_peak_bytes(model: Any, config: Any, mask: KeepMask, batch: int, seq: int) -> int:
    """What the engine holds to run `batch` rows of `seq` tokens under `mask`: weights + a pool
    of `batch` rows' pages (`rap.core.memory.kv_row_pages` in the layer that needs most) +
    one step's activations (`rap.core.memory.step_activation_bytes`)."""
    cfg, dt = model.config, model.dtype
    per_row = max(
        memory.kv_row_pages(w, seq, config.page_tokens, config.max_step_tokens)
        for w in model.dims.windows
    )
    pool = memory.kv_pool_bytes(cfg, mask, dt, config.page_tokens, batch * per_row)
    step = memory.step_activation_bytes(cfg, config.max_step_tokens, config.max_batch_size, dt)
    return memory.weight_bytes(cfg, mask, dt) + pool + step
