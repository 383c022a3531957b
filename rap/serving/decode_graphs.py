"""Decode steps replayed from CUDA graphs, one graph per decoder layer, batch size and page span.

Why: a decode step of a 7B model launches ~20 small kernels per layer from Python, and on an
H200 the step took 20–30 ms at masks whose bytes take 2–4 ms to read
(`bench/results/gpu/h200-run1.json`): the host, not the memory, set the pace. A replayed graph
launches a layer's kernels at once.

What is captured: one decoder layer's forward, as the mask has it (a dropped block is a
`DroppedBranch` in the layer, so the graph simply has no kernels for it). The mask stays
outside the graphs: each graph is keyed by

    (layer, the data pointers of its block buffers and KV slabs, B, M)

so a new mask re-captures only the layers whose blocks it drops or restores (a restored block
has new buffers), each with one eager warm-up and one capture; nothing is compiled. B is the
number of rows (exact: no padding rows that would need pages of their own), M the pages each
row's table spans, rounded up to `PAGE_SPAN` pages so that a row's growth re-captures once
every PAGE_SPAN · page_tokens tokens.

Everything a graph reads is a device tensor of its bucket (`Bucket`), refilled before each
step from one pinned host copy:

    hidden [1, B, H]   the residual stream, read and overwritten in place by each layer's graph
    cos, sin           rotary embeddings of the step's positions (computed eagerly, copied in)
    table [Lk, B, M]   row b's pages in the l-th kept attention layer, padded with its first page
    write_page [Lk, B], write_slot [B]   where this step's key/value of row b goes
    seen [B]           keys row b attends to after the write (j < seen_b; no sliding windows)

so the attention is `paged_attention`'s batched decode formula with the key range [0, seen_b).
Graphs run only where it holds: every row decodes one token, all rows run the same blocks (no
`rap.core.gates` gating), the model has no sliding window or score soft-capping, on CUDA.
Otherwise the eager step runs. The graphs of all buckets share one memory pool (replayed one
at a time, on one stream), so their transients take about one step's activations;
`reset()` lets it go (the engine calls it before it frees memory).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rap.serving.kv_pages import PagePool, RowPages
from rap.serving.paged_attention import RowStep, grouped_attention

PAGE_SPAN = 16
"""Pages a row's table grows by at a time (one capture per 256 tokens at 16-token pages)."""
MAX_BUCKETS = 8
"""(B, M) shapes kept at once; the least recently used goes first."""

Replay = Callable[[], None]
Capture = Callable[[Callable[[bool], None], Any], Replay]
"""`capture(run, pool)` → something that runs `run(True)`'s kernels again when called.
`run(write)` is the layer on the bucket's buffers; with `write`, its output overwrites the
bucket's hidden states (a warm-up must not: the replay reads them)."""


def cuda_capture(run: Callable[[bool], None], pool: Any) -> Replay:
    """`run` warmed up on a side stream (cuBLAS workspaces, lazy inits), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(False)  # writes this step's keys/values; the replay writes the same values again
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the restore thread (rap.serving.restores) may copy blocks meanwhile
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        run(True)
    return graph.replay


def eager_capture(run: Callable[[bool], None], pool: Any) -> Replay:
    """The same contract without CUDA (tests on a CPU): replaying runs `run(True)` again on the
    bucket's buffers, so the static plumbing is checked everywhere but in the capture itself."""
    return lambda: run(True)


@dataclass
class GraphStats:
    captures: int = 0
    capture_s: float = 0.0
    graphed_steps: int = 0

    def note_capture(self, seconds: float) -> None:
        self.captures += 1
        self.capture_s += seconds

    def note_graphed(self) -> None:
        self.graphed_steps += 1


@dataclass
class Bucket:
    """The device buffers the graphs of one (B, M) shape read, and those graphs (module doc)."""

    pool: PagePool
    layers: list[int]
    batch: int
    span: int
    hidden: torch.Tensor
    positions: torch.Tensor
    host: torch.Tensor
    device: torch.Tensor
    rows_key: tuple[int, ...] = ()
    rotary: tuple[torch.Tensor, ...] = ()
    last_inputs: tuple[Any, Any] = (None, None)
    kv: GraphKV | None = None
    copied: Any = None
    graphs: dict[int, tuple[tuple[Any, ...], Replay]] = field(default_factory=dict)

    @property
    def layout(self) -> tuple[int, int, int]:
        return len(self.layers), self.batch, self.span

    # -- what DecodeGraphs changes, by name -------------------------------------------------------
    def attach(self, kv: GraphKV) -> None:
        """The cache object its graphs are captured with (it holds this bucket)."""
        self.kv = kv

    def keep_graph(self, index: int, entry: tuple[tuple[Any, ...], Replay]) -> None:
        """Layer `index`'s graph, keyed by its blocks' data pointers."""
        self.graphs[index] = entry

    def filled_for(self, rows_key: tuple[int, ...]) -> None:
        """Its tables were filled for these rows (their page dicts' ids)."""
        self.rows_key = rows_key

    def copy_started(self, event: Any) -> None:
        """Its host → device copy was queued; `event` marks when it has read the host."""
        event.record()
        self.copied = event

    def copy_inputs(self, inputs: tuple[Any, Any]) -> None:
        """The step's rotary embeddings and positions into its buffers (the first layer of a
        step; the others get the same objects)."""
        rotary, positions = inputs
        if rotary is not None:
            if not self.rotary:
                self.rotary = tuple(t.clone() for t in rotary)
            else:
                for mine, new in zip(self.rotary, rotary, strict=True):
                    mine.copy_(new)
        if isinstance(positions, torch.Tensor):
            self.positions.copy_(positions)
        self.last_inputs = inputs

    def views(self, t: Any) -> tuple[Any, ...]:
        """(table [Lk, B, M], write_page [Lk, B], write_slot [B], seen [B]) inside `t` (the
        device buffer, or the host buffer as a NumPy array: element writes from Python are
        ~20× cheaper there than on a tensor)."""
        lk, b, m = self.layout
        ends = [lk * b * m, lk * b * m + lk * b, lk * b * m + lk * b + b]
        return (
            t[: ends[0]].reshape(lk, b, m),
            t[ends[0] : ends[1]].reshape(lk, b),
            t[ends[1] : ends[2]],
            t[ends[2] :],
        )


class GraphKV:
    """What the layers see as their KV cache while a bucket's graphs are captured: every index
    comes from the bucket's device buffers (module doc), so a replay needs no Python."""

    def __init__(self, bucket: Bucket) -> None:
        # No reference back to the bucket: a cycle would keep it (and its PagePool's slabs)
        # alive after `reset()` until the garbage collector ran — on an H100 that held a
        # 34 GB pool past its end and the next allocation failed.
        self.pool = bucket.pool
        self.index = {layer: i for i, layer in enumerate(bucket.layers)}
        self.table, self.write_page, self.write_slot, self.seen = bucket.views(bucket.device)
        tokens = bucket.span * bucket.pool.page_tokens
        self.key_index = torch.arange(tokens, device=bucket.device.device)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K_l[write_page_b, write_slot_b] = key_b for every row b ([1, n_kv, B, d] in)."""
        pool, at = self.pool, (self.write_page[self.index[layer_idx]], self.write_slot)
        pool.store(layer_idx, at, key[0].transpose(0, 1), value[0].transpose(0, 1))
        return key, value

    def attend(
        self, layer: int, query: torch.Tensor, scaling: float | None, softcap: float | None
    ) -> torch.Tensor:
        """[1, H, B, d] queries → [1, B, H, d]: row b over its table's keys j < seen_b."""
        pool = self.pool
        pages = self.table[self.index[layer]]  # [B, M]
        k = pool.keys[layer][pages].flatten(1, 2)  # [B, M · page_tokens, n_kv, d]
        v = pool.values[layer][pages].flatten(1, 2)
        mask = (self.key_index[None, :] < self.seen[:, None])[:, None, None, :]
        batch, kv_heads, d = k.shape[0], k.shape[2], query.shape[-1]
        q = query[0].transpose(0, 1).reshape(batch, kv_heads, -1, d)  # heads grouped by KV head
        out = grouped_attention(q, k.transpose(1, 2), v.transpose(1, 2), mask, scaling, softcap)
        return out.reshape(batch, -1, d).unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def is_compileable(self) -> bool:  # pragma: no cover - only asked by generate()
        return False


class GraphedLayer(nn.Module):
    """Stands in for decoder layer `index` during a graphed step (by composition)."""

    def __init__(self, owner: DecodeGraphs, index: int, layer: nn.Module) -> None:
        super().__init__()
        self.owner, self.index, self.layer = owner, index, layer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.owner.run_layer(self.index, self.layer, hidden_states, kwargs)


class DecodeGraphs:
    """The graphs of one model's decode steps, by bucket (module doc)."""

    def __init__(self, model: Any, capture: Capture | None = None) -> None:
        self.model = model
        self.capture = capture or cuda_capture
        text = model.hf.config.get_text_config()
        self.supported = all(w is None for w in model.dims.windows) and not getattr(
            text, "attn_logit_softcapping", None
        )
        self.stats = GraphStats()
        self._buckets: OrderedDict[tuple[Any, ...], Bucket] = OrderedDict()
        self._current: Bucket | None = None
        self._last: Bucket | None = None
        self._mempool: Any = None

    def fits(self, rows: list[RowStep], gated: bool) -> bool:
        """Whether this step can replay graphs: every row decodes one token, no row skips a
        block the others run, the model has neither sliding windows nor soft-capping."""
        return self.supported and not gated and bool(rows) and all(r.count == 1 for r in rows)

    def note_eager(self) -> None:
        """An eager step ran: rows' pages may have grown outside every bucket's tables."""
        self._last = None

    def reset(self) -> None:
        """Forget every graph and buffer (their memory goes back at the next `empty_cache`)."""
        self._buckets.clear()
        self._current = self._last = self._mempool = None

    @contextlib.contextmanager
    def step(self, pool: PagePool, rows: list[RowStep]) -> Iterator[GraphKV]:
        """Prepare the step's buffers (pages taken, indices copied in) and run the model's
        decoder layers through their graphs inside the block; yields the KV to pass the model."""
        bucket = self._bucket(pool, rows)
        self._prepare(bucket, rows)
        layers = self.model.spec.layers(self.model.hf)
        originals = list(layers)
        for i, layer in enumerate(originals):
            layers[i] = GraphedLayer(self, i, layer)
        self._current = self._last = bucket
        assert bucket.kv is not None
        try:
            yield bucket.kv
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            self._current = None
        self.stats.note_graphed()

    def run_layer(
        self, index: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Layer `index` on the step's hidden states, from its graph (captured on first use
        or when its blocks or slabs moved); the result is the bucket's `hidden`, in place."""
        b = self._current
        assert b is not None, "run_layer outside DecodeGraphs.step"
        if hidden is not b.hidden:
            b.hidden.copy_(hidden)
        inputs = (kwargs.get("position_embeddings"), kwargs.get("position_ids"))
        if inputs[0] is not b.last_inputs[0] or inputs[1] is not b.last_inputs[1]:
            b.copy_inputs(inputs)
        key = tuple(p.data_ptr() for p in layer.parameters())
        entry = b.graphs.get(index)
        if entry is None or entry[0] != key:
            entry = (key, self._capture(b, layer, kwargs))
            b.keep_graph(index, entry)
        entry[1]()
        return b.hidden

    def _capture(self, b: Bucket, layer: nn.Module, kwargs: dict[str, Any]) -> Replay:
        call = dict(kwargs, past_key_values=b.kv, rap_kv=b.kv)
        if b.rotary:
            call["position_embeddings"] = b.rotary
        if isinstance(call.get("position_ids"), torch.Tensor):
            call["position_ids"] = b.positions

        hidden = b.hidden  # not `b`: the replay must not keep its bucket alive (GraphKV)

        def run(write: bool) -> None:
            out = layer(hidden, **call)
            if write:
                hidden.copy_(out)

        if self._mempool is None and b.hidden.is_cuda:
            self._mempool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        replay = self.capture(run, self._mempool)
        self.stats.note_capture(time.perf_counter() - start)
        return replay

    def _bucket(self, pool: PagePool, rows: list[RowStep]) -> Bucket:
        layers = pool.layers
        first = layers[0] if layers else -1  # no attention layer kept: no pages at all
        most = max((_pages_after(r.pages.get(first), pool) for r in rows), default=1)
        span = max(1, -(-most // PAGE_SPAN)) * PAGE_SPAN
        slabs = tuple(pool.keys[n].data_ptr() for n in layers)
        slabs += tuple(pool.values[n].data_ptr() for n in layers)
        key = (len(rows), span, tuple(layers), slabs, id(pool))
        if key in self._buckets:
            self._buckets.move_to_end(key)
            return self._buckets[key]
        bucket = _new_bucket(self.model, pool, layers, len(rows), span)
        self._buckets[key] = bucket
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return bucket

    def _prepare(self, b: Bucket, rows: list[RowStep]) -> None:
        """Take each row's page for this step's token (as `PagePool.write_tokens` would) and
        fill the bucket's indices: the tables whole when the rows changed or an eager step
        ran since this bucket's last, else only the pages just taken."""
        if b.copied is not None:
            b.copied.synchronize()  # the last step's copy has read the host buffer
        table, write_page, write_slot, seen = b.views(b.host.numpy())
        rows_key = tuple(id(r.pages) for r in rows)
        whole = rows_key != b.rows_key or b is not self._last
        b.filled_for(rows_key)
        page_tokens = b.pool.page_tokens
        for i, r in enumerate(rows):
            held = -1
            for li, layer in enumerate(b.layers):
                pages = r.pages.setdefault(layer, RowPages())
                before = held
                held = pages.length - pages.start
                if before not in (-1, held):
                    raise RuntimeError(f"row holds {before} and {held} tokens in two layers")
                if pages.full(page_tokens):
                    pages.pages.append(b.pool.alloc(layer))
                    table[li, i, len(pages.pages) - 1] = pages.pages[-1]
                if whole:
                    n = len(pages.pages)
                    table[li, i, :n] = pages.pages
                    table[li, i, n:] = pages.pages[0]
                write_page[li, i] = pages.pages[-1]
                pages.wrote(1)
            write_slot[i] = max(held, 0) % page_tokens
            seen[i] = max(held, 0) + 1
        b.device.copy_(b.host, non_blocking=True)
        if b.device.is_cuda:
            b.copy_started(torch.cuda.Event())


def _pages_after(pages: RowPages | None, pool: PagePool) -> int:
    """Pages a row holds in a layer once this step's token is written."""
    if pages is None:
        return 1
    return len(pages.pages) + int(pages.full(pool.page_tokens))


def _new_bucket(model: Any, pool: PagePool, layers: list[int], batch: int, span: int) -> Bucket:
    device = pool.keys[layers[0]].device if layers else model.device
    lk = len(layers)
    n = lk * batch * span + lk * batch + 2 * batch
    pinned = torch.device(device).type == "cuda"
    bucket = Bucket(
        pool=pool,
        layers=layers,
        batch=batch,
        span=span,
        hidden=torch.zeros(1, batch, model.dims.hidden, dtype=model.dtype, device=device),
        positions=torch.zeros(1, batch, dtype=torch.long, device=device),
        host=torch.zeros(n, dtype=torch.long, pin_memory=pinned),
        device=torch.zeros(n, dtype=torch.long, device=device),
    )
    bucket.attach(GraphKV(bucket))
    return bucket
