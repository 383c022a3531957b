"""Per-step scheduling over KV pages: the core of the replica's engine (no asyncio, no Ray).

Invariant: every step runs one batched forward (`rap.serving.paged_attention`) for all running
rows — one new token for each decoding row, a chunk of the prompt for prefilling rows — and no
row holds more KV pages than it reserved when it was admitted.

    admit:   FIFO, while fewer than `max_running` rows run and every kept attention layer still
             has the pages the head request reserves: for a row of S = prompt + max_tokens
             tokens, `rap.core.memory.kv_row_pages(W_l, S, P, chunk)` pages in layer l. A row
             that could never fit an empty pool is refused (503); one that waits longer than
             `max_wait_s` gets a 503 with Retry-After.
    compose: every decoding row gives 1 token; prefilling rows then share the rest of the
             step's token budget (`max_step_tokens`) in admission order, so a long prompt never
             stalls running rows for more than one step.
    run:     one forward; the logits of each row's last token decide its next token (greedy,
             or sampled with its own temperature, top_p and seed), so rows with different
             sampling settings share steps.
    finish:  a row leaves at its end-of-sequence token, a stop string (`TextStream`),
             `max_tokens`, or `cancel`; its pages are freed in that step.

Events go to each row's `sink` (`rap.serving.events`): a start, its tokens, then exactly one
done or error.
An error in one step (the forward raising) fails the rows of that step; the scheduler goes on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Any

import torch

from rap.core import memory
from rap.core.gates import gating
from rap.core.masks import KeepMask
from rap.serving import row_masks
from rap.serving.batching import compose
from rap.serving.decode_graphs import DecodeGraphs
from rap.serving.engine_config import SchedulerConfig
from rap.serving.events import DoneEvent, ErrorEvent, Sink, start_event, token_event
from rap.serving.kv_pages import PagePool
from rap.serving.outbox import Outbox
from rap.serving.paged_attention import PagedKV, RowStep, paged
from rap.serving.rows import (
    Request,
    Row,
    done_event,
    expired_event,
    failed_event,
    stalled_event,
    too_big_event,
    waited_out_event,
)
from rap.serving.sampling import pick_tokens
from rap.serving.shedding import Shedder
from rap.serving.stats import StepStats
from rap.serving.text_stream import TextStream


class Scheduler:
    """Rows waiting and running over one `PagePool` (module doc)."""

    def __init__(self, model: Any, pool: PagePool, config: SchedulerConfig) -> None:
        self.model = model
        self.pool = pool
        self.config = config
        self.windows = model.dims.windows
        self.eos = model.eos_ids()
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.stats = StepStats()
        self._lock = threading.Lock()
        self._cancelled: set[int] = set()
        self._next_id = 0
        self._shedder = Shedder(config.shed_wait_s, config.retry_after_s)
        self.admitting = True
        """False while the engine switches masks: running rows finish, nobody new starts."""
        self.graphs: DecodeGraphs | None = None
        if config.cuda_graphs and torch.device(model.device).type == "cuda":
            self.graphs = DecodeGraphs(model)

    # -- from any thread ---------------------------------------------------------------------
    def add(self, request: Request, sink: Sink) -> int:
        """Queue a request; returns its id (for `cancel`)."""
        with self._lock:
            self._next_id += 1
            text = TextStream(self.model.decode, request.stop)
            generator = None
            if request.temperature > 0:
                generator = torch.Generator().manual_seed(
                    request.seed if request.seed is not None else int(time.time_ns() % 2**63)
                )
            row = Row(self._next_id, request, sink, text, time.monotonic(), generator=generator)
            self.waiting.append(row)
            return row.id

    def cancel(self, row_id: int) -> None:
        """Stop a request (its client went away): it leaves at the next step, pages freed."""
        with self._lock:
            self._cancelled.add(row_id)

    def preempt(self, row: Row) -> None:
        """Take a running row out by recompute: its pages go back now, it waits at the head of
        the queue with its tokens (prompt + generated), and when admitted again its KV is
        recomputed and it goes on where it stopped; its client sees a pause, nothing else."""
        self.pool.drop(row.pages)
        self.running.remove(row)
        row.put_back(time.monotonic())  # its wait for pages starts again
        with self._lock:
            self.waiting.appendleft(row)
        self.stats.note_preempted()

    def drop_graphs(self) -> None:
        """Forget the decode graphs before the pool or the mask changes (their buffers hold
        the pool, and their memory pool one step's transients: bytes go down first)."""
        if self.graphs is not None:
            self.graphs.reset()

    def fit(self, capacity: int) -> int:
        """Preempt the youngest running rows until every layer's reservations fit `capacity`
        pages (before the pool shrinks to it); returns how many were preempted."""
        preempted = 0
        while self.running and any(n > capacity for n in self._reserved().values()):
            self.preempt(self.running[-1])  # admitted last
            preempted += 1
        return preempted

    # -- what the switcher changes, by name (rap.serving.switching) ----------------------------
    def pause_admission(self) -> None:
        """Running rows go on, nobody new starts (a switch waits for them)."""
        self.admitting = False

    def resume_admission(self) -> None:
        self.admitting = True

    def replace_pool(self, pool: PagePool) -> None:
        """A new pool while no row runs (nothing holds a page of the old one)."""
        assert not self.running, "a pool is replaced only while no row runs"
        self.pool = pool

    def resize_pool(self, capacity: int) -> None:
        """Pages per layer become `capacity`, the running rows' pages moved below it
        (`PagePool.resize`; their reservations fit it: `fit` first)."""
        self.pool.resize(capacity, [r.pages for r in self.running])

    def narrow_rows(self, narrowed: KeepMask, floor: float) -> None:
        """Every running row loses what `narrowed` drops from its next step, its pages and
        reservations in those attention layers back to the pool; a row that would fall below
        `floor` (or its request's own minimum) is preempted instead, to be recomputed under a
        mask that meets it."""
        for row in list(self.running):
            least = max(floor, row.request.min_kept_fraction)
            assert row.mask is not None, "a running row has a mask"
            if row_masks.intersect(row.mask, narrowed).kept_fraction < least:
                self.preempt(row)
        for row in self.running:
            for layer in row.narrow_to(narrowed):
                pages = row.lose_layer(layer)
                if pages is not None:
                    self.pool.release(layer, pages.pages)

    def drop_layers(self, layers: list[int]) -> None:
        """Free these attention layers' slabs whole (no row holds pages there any more)."""
        for layer in layers:
            self.pool.drop_layer(layer)

    def add_layers(self, layers: list[int]) -> None:
        """Slabs of the pool's capacity for restored attention layers (for new rows)."""
        for layer in layers:
            self.pool.add_layer(layer)

    def take_longest(self) -> int:
        """The longest row admitted since the last call (0: none), for the engine's shapes."""
        return self.stats.take_longest()

    def reserved_pages(self) -> int:
        """The most pages the running rows reserve in any one layer."""
        return max(self._reserved().values(), default=0)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, compose, run one forward, hand out tokens, free what finished (module doc).
        Returns whether a forward ran (False: nothing to run, or every running row waits for
        its client)."""
        self._drop_cancelled()
        self._drop_expired()
        self._drop_stalled()
        self._admit()
        if not self.running:
            return False
        batch = compose(self.running, self.config.max_step_tokens, self._waits_for_client)
        self.stats.note_prefill(batch.prefill_tokens)
        rows, ids, positions = batch.rows, batch.ids, batch.positions
        if not rows:
            return False
        kv = PagedKV(self.pool, [step for _, step in rows], self.windows)
        try:
            logits = self._forward(ids, positions, kv, rows)
        except Exception as exc:  # one step's failure fails its rows, never the scheduler
            for row, _ in rows:
                self._end(row, failed_event("generation failed", exc))
            return True
        kv.finish_step()
        self.stats.note_step()
        for row, step in rows:
            row.cached(step.count)
        wanted = [(row, lg) for (row, _), lg in zip(rows, logits, strict=True) if lg is not None]
        for row, token in self._pick(wanted):
            try:
                self._next_token(row, token)
            except Exception as exc:  # one row's text or events failing ends that row only
                self._end(row, failed_event("handing out the next token failed", exc))
        return True

    _pick = staticmethod(pick_tokens)  # a seam: tests see each row's logits through it

    def _forward(
        self,
        ids: list[int],
        positions: list[int],
        kv: PagedKV,
        rows: list[tuple[Row, RowStep]],
    ) -> list[torch.Tensor | None]:
        """One batched forward; the logits at each row's last token when it needs a token."""
        want = [
            (i, s.offset + s.count - 1)
            for i, (r, s) in enumerate(rows)
            if s.first_pos + s.count >= len(r.tokens)
        ]
        device = self.model.device
        keep = torch.tensor([j for _, j in want], dtype=torch.long, device=device)
        with (
            torch.inference_mode(),
            self.model.holding_mask() as mask,
            paged(self.model.hf),
            contextlib.ExitStack() as stack,
        ):
            gates = row_masks.gate_positions(rows, mask, device)
            step_kv: Any = kv
            if self.graphs is not None and self.graphs.fits(kv.rows, bool(gates)):
                step_kv = stack.enter_context(self.graphs.step(self.pool, kv.rows))
            else:
                stack.enter_context(gating(self.model, gates))
                if self.graphs is not None:
                    self.graphs.note_eager()
            out = self.model.hf(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.tensor([positions], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                past_key_values=step_kv,
                use_cache=True,
                rap_kv=step_kv,
                logits_to_keep=keep,
            )
        self.stats.note_forward(len(ids))
        result: list[torch.Tensor | None] = [None] * len(rows)
        for k, (i, _) in enumerate(want):
            result[i] = out.logits[0, k].float()
        return result

    def _next_token(self, row: Row, token: int) -> None:
        req = row.request
        self.stats.note_generated()
        if token in self.eos and not req.ignore_eos:
            self._end(row, done_event(row, "stop", counted=1))
            return
        row.generated.append(token)
        text = row.text.push(token)
        if text:
            row.sink(token_event(text))
        if row.text.stopped:
            self._end(row, done_event(row, "stop"))
        elif len(row.generated) >= req.max_tokens:
            tail = row.text.flush()
            if tail:
                row.sink(token_event(tail))
            self._end(row, done_event(row, "length"))

    def _end(self, row: Row, event: DoneEvent | ErrorEvent) -> None:
        """The row leaves: its pages go back to the pool this step, and its client gets its one
        terminal event (an error event if delivering `event` fails)."""
        self.pool.drop(row.pages)
        if row in self.running:
            self.running.remove(row)
        try:
            row.sink(event)
        except Exception as exc:
            row.sink(failed_event("delivering the request's last event failed", exc))

    def _waits_for_client(self, row: Row) -> bool:
        """Whether the row sits this step out: its outbox is full (it keeps its pages)."""
        full = isinstance(row.sink, Outbox) and row.sink.full
        row.note_outbox(full, time.monotonic())
        return full

    def _drop_stalled(self) -> None:
        """Rows whose client left the outbox full for `client_stall_s` are cancelled."""
        now, limit = time.monotonic(), self.config.client_stall_s
        for row in list(self.running):
            since = row.stalled_s
            if since is not None and now - since >= limit and self._waits_for_client(row):
                self._end(row, stalled_event(limit, len(row.generated)))

    # -- admission ---------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        for row in [r for r in self.running if r.id in cancelled]:
            self._end(row, done_event(row, "cancelled"))
        for row in [r for r in self.waiting if r.id in cancelled]:
            self.waiting.remove(row)
            row.sink(done_event(row, "cancelled"))

    def _drop_expired(self) -> None:
        """Rows whose deadline passed leave now, waiting or running: work stops with them."""
        now = time.monotonic()
        late = [r for r in [*self.running, *self.waiting] if (r.request.deadline_s or now) < now]
        for row in late:
            if row in self.waiting:
                with self._lock:
                    self.waiting.remove(row)
            self._end(row, expired_event(len(row.generated)))

    def _waited_out(self, row: Row, kept: float) -> ErrorEvent:
        """The 503 of a row that waited `max_wait_s` (`rap.serving.rows.waited_out_event`)."""
        need = max(self.reservation(row.request).values(), default=0)
        return waited_out_event(row, kept, need, self.pool.capacity, self.config)

    def reservation(self, request: Request) -> dict[int, int]:
        """Pages per kept attention layer a request reserves at admission (module doc)."""
        tokens = len(request.prompt_ids) + request.max_tokens
        chunk = self.config.max_step_tokens
        return {
            layer: memory.kv_row_pages(self.windows[layer], tokens, self.pool.page_tokens, chunk)
            for layer in self.pool.layers
        }

    def _reserved(self) -> dict[int, int]:
        used = dict.fromkeys(self.pool.layers, 0)
        for row in self.running:
            for layer, n in row.reserved.items():
                if layer in used:  # a restored layer: older rows hold nothing there
                    used[layer] += n
        return used

    def _admit(self) -> None:
        now = time.monotonic()
        admitted = self.stats.admitted
        kept = self.model.mask.kept_fraction
        with self._lock:
            for row in [r for r in self.waiting if now - r.arrived_s > self.config.max_wait_s]:
                self.waiting.remove(row)
                row.sink(self._waited_out(row, kept))
            used = self._reserved()
            held_back = False  # a stream put back by a budget cut waits for memory at the head
            # FIFO among the rows the current mask may serve; a row that asked for more blocks
            # than the model keeps now waits without holding up the others.
            for row in [r for r in self.waiting if r.request.min_kept_fraction <= kept]:
                if not self.admitting or len(self.running) >= self.config.max_running:
                    break
                need = self.reservation(row.request)
                if any(n > self.pool.capacity for n in need.values()):
                    if row.preemptions:  # it waits (up to max_wait_s) for memory to return
                        held_back = True
                        continue
                    self.waiting.remove(row)
                    row.sink(too_big_event(need, self.pool, self.config.retry_after_s))
                    continue
                if held_back:
                    continue  # nobody overtakes it; a request too big for the pool still hears so
                if any(used[layer] + n > self.pool.capacity for layer, n in need.items()):
                    break  # the first such row waits for pages; nobody overtakes it
                self._start(row, need, used)
            self._shed(now, self.stats.admitted - admitted)

    def _shed(self, now: float, started: int) -> None:
        """Refuse the new rows whose predicted start is too late (`rap.serving.shedding`);
        runs under the lock, after admission."""
        for row, event in self._shedder.judge(now, started, list(self.waiting), self._next_id):
            self.waiting.remove(row)
            self.stats.note_shed()
            row.sink(event)

    def _start(self, row: Row, need: dict[int, int], used: dict[int, int]) -> None:
        """Admit a waiting row with its reservation (`used`: pages reserved per layer so far)."""
        self.waiting.remove(row)
        row.start_under(self.model.mask, need)
        for layer, n in need.items():
            used[layer] += n
        self.running.append(row)
        if row.preemptions:  # resumed: its client has had its start event
            self.stats.note_admitted(None)
            return
        self.stats.note_admitted(len(row.request.prompt_ids) + row.request.max_tokens)
        row.sink(start_event(len(row.request.prompt_ids), self.model.mask.fingerprint()))
