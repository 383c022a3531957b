"""KV cache in fixed-size pages, owned per (request, attention layer).

Each kept attention layer has one slab of `capacity` pages for keys and one for values:

    K_l, V_l : [capacity, page_tokens, n_kv, d]    bytes = 2 · capacity · page_tokens · n_kv · d · b

(`rap.core.memory.kv_page_bytes` per page and layer; the pool's bytes are exactly
layers × capacity × that, `PagePool.nbytes`). A request owns a list of pages per layer; token
t of a row lives at page t // page_tokens (counted from the row's first kept page), slot
t % page_tokens. A sliding-window layer hands back the pages its row can no longer attend to.
A layer whose attention block is dropped has no slab at all. Pages are allocated as rows grow
and freed the moment a row leaves, so the bytes in use follow the running rows step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rap.core.errors import RapError
from rap.core.weights import cpu_block_buffer


class PoolExhaustedError(RapError):
    """No free page in a layer's slab: the scheduler reserves pages so this never reaches a
    client; seeing it means the reservation rule was broken."""


@dataclass
class RowPages:
    """One row's pages in one layer: tokens [start, length) are held, in `pages` in order."""

    pages: list[int] = field(default_factory=list)
    start: int = 0
    """Position of the first token the first page holds (sliding windows drop older pages)."""
    length: int = 0
    """Tokens written so far (positions 0 .. length − 1 exist or existed)."""

    def full(self, page_tokens: int) -> bool:
        """Whether the next token needs a new page: every page held is full (or none is)."""
        return self.length - self.start == len(self.pages) * page_tokens

    # -- what the pool changes, by name ---------------------------------------------------------
    def wrote(self, tokens: int) -> None:
        self.length += tokens

    def moved(self, index: int, page: int) -> None:
        """Its `index`-th page now lives at `page` (compaction copied its keys and values)."""
        self.pages[index] = page

    def dropped_first(self, page_tokens: int) -> int:
        """Its first page, handed back: the window has passed it."""
        self.start += page_tokens
        return self.pages.pop(0)

    def cleared(self) -> list[int]:
        """Every page it held, handed back."""
        pages, self.pages = self.pages, []
        return pages


class PagePool:
    """K/V slabs for the attention layers that are kept, with a free list per layer."""

    def __init__(
        self,
        layers: list[int],
        capacity: int,
        page_tokens: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity < 0 or page_tokens < 1:
            raise RapError(
                f"a page pool of {capacity} pages of {page_tokens} tokens",
                expected="0 or more pages of at least one token",
            )
        self.page_tokens = page_tokens
        self.capacity = capacity
        self._head_shape, self._dtype, self._device = (kv_heads, head_dim), dtype, device
        shape = (capacity, page_tokens, kv_heads, head_dim)
        self.keys = {layer: slab(shape, dtype, device) for layer in layers}
        self.values = {layer: slab(shape, dtype, device) for layer in layers}
        # Lowest page first: a freed page is reused before untouched ones.
        self._free = {layer: list(range(capacity - 1, -1, -1)) for layer in layers}

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes the slabs hold (what the memory model predicts)."""
        slabs = [*self.keys.values(), *self.values.values()]
        return sum(t.untyped_storage().nbytes() for t in slabs)

    def free_pages(self, layer: int) -> int:
        return len(self._free[layer])

    def free_total(self) -> int:
        return sum(len(f) for f in self._free.values())

    def used_pages(self) -> int:
        return sum(self.capacity - len(f) for f in self._free.values())

    def used_bytes(self) -> int:
        """Bytes of the pages rows hold (K and V), over all layers."""
        page = 2 * self.page_tokens * self._head_shape[0] * self._head_shape[1]
        return self.used_pages() * page * torch.empty(0, dtype=self._dtype).element_size()

    def alloc(self, layer: int) -> int:
        free = self._free[layer]
        if not free:
            raise PoolExhaustedError(
                f"attention layer {layer} has no free KV page ({self.capacity} in use)",
                expected="admission to reserve pages before rows grow",
            )
        return free.pop()

    def release(self, layer: int, pages: list[int]) -> None:
        self._free[layer].extend(reversed(pages))

    def drop_layer(self, layer: int) -> None:
        """Free a layer's slabs whole (its attention block was dropped): every row's pages
        there go with them; the rows skip the layer from now on."""
        del self.keys[layer], self.values[layer], self._free[layer]
        _give_back(self._device)

    def add_layer(self, layer: int) -> None:
        """Slabs of the pool's capacity for a layer whose attention block was restored (only
        rows admitted from now on use it)."""
        shape = (self.capacity, self.page_tokens, *self._head_shape)
        self.keys[layer] = slab(shape, self._dtype, self._device)
        self.values[layer] = slab(shape, self._dtype, self._device)
        self._free[layer] = list(range(self.capacity - 1, -1, -1))

    def resize(self, capacity: int, rows: list[dict[int, RowPages]]) -> None:
        """Change every layer's capacity under running rows. Shrink: pages at or above the new
        capacity move into free pages below it (their rows' page lists follow), then each
        layer's slabs are cut to size one layer at a time, so at most one layer's new slabs
        exist beside the old ones. The rows' pages must fit (the scheduler preempts first).
        Grow: each layer's slabs get the new pages after the old ones."""
        for layer in self.layers:
            held = [r[layer] for r in rows if layer in r]
            if capacity < self.capacity:
                self._compact(layer, capacity, held)
            k, v = self.keys[layer], self.values[layer]
            self.keys[layer], self.values[layer] = _resized(k, capacity), _resized(v, capacity)
            del k, v  # the old slabs go before the next layer's new ones are made
            used = {p for r in held for p in r.pages}
            self._free[layer] = [p for p in range(capacity - 1, -1, -1) if p not in used]
        self.capacity = capacity
        _give_back(self._device)

    def _compact(self, layer: int, capacity: int, held: list[RowPages]) -> None:
        used = {p for r in held for p in r.pages}
        spare = [p for p in range(capacity) if p not in used]
        for row in held:
            for i, page in enumerate(row.pages):
                if page >= capacity:
                    if not spare:
                        raise PoolExhaustedError(
                            f"layer {layer}: rows hold more pages than {capacity}",
                            expected="the scheduler to preempt rows before shrinking the pool",
                        )
                    new = spare.pop(0)
                    self.keys[layer][new] = self.keys[layer][page]
                    self.values[layer][new] = self.values[layer][page]
                    row.moved(i, new)

    # -- rows ------------------------------------------------------------------------------
    def write(self, layer: int, row: RowPages, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append `key`/`value` ([tokens, n_kv, d]) at the end of `row` in `layer`."""
        done, n = 0, key.shape[0]
        while done < n:
            slot = (row.length - row.start) % self.page_tokens
            if row.full(self.page_tokens):
                row.pages.append(self.alloc(layer))
            page = row.pages[-1]
            take = min(self.page_tokens - slot, n - done)
            self.keys[layer][page, slot : slot + take] = key[done : done + take]
            self.values[layer][page, slot : slot + take] = value[done : done + take]
            row.wrote(take)
            done += take

    def read(self, layer: int, row: RowPages) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [row.start, row.length), each [tokens, n_kv, d]."""
        n = row.length - row.start
        idx = torch.tensor(row.pages, dtype=torch.long, device=self.keys[layer].device)
        k = self.keys[layer].index_select(0, idx).flatten(0, 1)[:n]
        v = self.values[layer].index_select(0, idx).flatten(0, 1)[:n]
        return k, v

    def write_tokens(
        self, layer: int, rows: list[RowPages], key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Append one token to each of `rows` (a decode step): `key`/`value` [rows, n_kv, d].
        Row b's token goes where `write` would put it, at page pages_b[-1] (a new one when the
        last is full) and slot (length_b − start_b) mod page_tokens; then one indexed store
        per slab, K_l[page_b, slot_b] = key_b, instead of one small copy per row."""
        pages, slots = [], []
        for row in rows:
            if row.full(self.page_tokens):
                row.pages.append(self.alloc(layer))
            pages.append(row.pages[-1])
            slots.append((row.length - row.start) % self.page_tokens)
            row.wrote(1)
        where = device_longs(pages + slots, self.keys[layer].device)
        self.store(layer, (where[: len(rows)], where[len(rows) :]), key, value)

    def store(
        self,
        layer: int,
        at: tuple[torch.Tensor, torch.Tensor],
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None:
        """K_l[page_b, slot_b] = key_b and the same for V: one indexed store per slab (`at`:
        the pages and the slots, as index tensors; a decode graph captures this store)."""
        self.keys[layer][at] = key
        self.values[layer][at] = value

    def read_rows(self, layer: int, rows: list[RowPages]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Keys and values of several rows in one gather, padded: [rows, M · page_tokens, n_kv,
        d] with M the most pages a row holds; row b's position start_b + j sits at index j for
        j < length_b − start_b. Shorter rows repeat their first page (or page 0) to M: the
        caller masks those indices out. Returns (keys, values, M · page_tokens)."""
        most = max(len(row.pages) for row in rows)
        ids = [p for row in rows for p in _padded(row.pages, most)]
        idx = device_longs(ids, self.keys[layer].device).view(len(rows), most)
        k = self.keys[layer][idx].flatten(1, 2)  # [rows, most, P, n_kv, d] → [rows, L, ...]
        v = self.values[layer][idx].flatten(1, 2)
        return k, v, most * self.page_tokens

    def trim_window(self, layer: int, row: RowPages, keep_from: int) -> None:
        """Hand back the pages that hold only positions below `keep_from` (a sliding window)."""
        while row.pages and row.start + self.page_tokens <= keep_from:
            self.release(layer, [row.dropped_first(self.page_tokens)])

    def drop(self, rows: dict[int, RowPages]) -> None:
        """Free every page a request holds (it finished, stopped or was cancelled)."""
        for layer, row in rows.items():
            self.release(layer, row.cleared())


def slab(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed K/V slab. On a CPU, a mapping of its own (`cpu_block_buffer`: zero pages until
    written), so that a freed slab leaves the process: from glibc's malloc, a large chunk freed
    once raises its mmap threshold and later slabs come from, and go back to, its heap (RSS
    does not fall). On a GPU, torch's caching allocator (`empty_cache` returns it)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return cpu_block_buffer(math.prod(shape), dtype).view(shape)


def device_longs(values: list[int], device: torch.device | str) -> torch.Tensor:
    """Small int64 index tensor on `device`. On a GPU, from pinned memory without blocking:
    a plain copy from pageable memory waits for the GPU to drain first, once per layer and
    step otherwise (torch's pinned allocator keeps the buffer until the copy has run)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    host = torch.tensor(values, dtype=torch.long, pin_memory=True)
    return host.to(device, non_blocking=True)


def _padded(pages: list[int], most: int) -> list[int]:
    """`pages` repeated-first to `most` entries (any held page will do: it is masked out)."""
    fill = pages[0] if pages else 0
    return pages + [fill] * (most - len(pages))


def _give_back(device: torch.device | str) -> None:
    """Return freed slabs to the device: torch's caching allocator keeps them reserved for the
    process otherwise, and the other tenants' free memory would not move."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _resized(old: torch.Tensor, capacity: int) -> torch.Tensor:
    """A slab of `capacity` pages holding the first pages of `old` (zeros after them)."""
    out = slab((capacity, *old.shape[1:]), old.dtype, old.device)
    keep = min(capacity, old.shape[0])
    out[:keep] = old[:keep]  # a copy: a view would keep the whole old slab alive
    return out
