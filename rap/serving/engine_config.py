"""How a replica schedules, admits and changes masks: the engine's configuration, every field
with its default and why (`rap.serving.engine` runs it)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from rap.core.constants import STEP_TOKENS


class SchedulerConfig(BaseModel):
    """How a replica schedules its steps."""

    max_running: int = Field(8, ge=1, description="Rows decoding or prefilling at once.")
    max_step_tokens: int = Field(
        256, ge=1, description="New tokens in one step (decodes + prefill chunks)."
    )
    page_tokens: int = Field(16, ge=1, description="Tokens per KV page.")
    max_wait_s: float = Field(30.0, gt=0, description="Longest wait in the queue before a 503.")
    shed_wait_s: float | None = Field(
        None,
        gt=0,
        description="A new request whose predicted start is further away is refused at once "
        "(503 `overloaded`, `rap.serving.shedding`); None: every request queues.",
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with a 503.")
    cuda_graphs: bool = Field(
        False,
        description="On a GPU, replay decode steps from CUDA graphs (`rap.serving.decode_graphs`) "
        "where they apply; ignored on a CPU.",
    )
    client_stall_s: float = Field(
        30.0,
        gt=0,
        description="A row whose client has left its outbox full this long is cancelled and "
        "its pages freed (`rap.serving.outbox`).",
    )


class EngineConfig(BaseModel):
    """How a replica schedules and admits work."""

    max_batch_size: int = Field(8, ge=1, description="Most rows running at once.")
    max_step_tokens: int = Field(
        STEP_TOKENS,
        ge=1,
        description="Tokens one step runs at most (prompts go in chunks of it); planners price "
        "steps of rap.core.constants.STEP_TOKENS.",
    )
    page_tokens: int = Field(16, ge=1, description="Tokens per KV page.")
    target_seq: int = Field(
        1024, ge=1, description="Tokens per row the pool is sized for at a full batch."
    )
    min_kept_fraction: float = Field(
        0.5, ge=0, le=1, description="Quality floor: fewest blocks kept, as a share of all."
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with a 503.")
    max_wait_s: float = Field(30.0, gt=0, description="Longest wait for KV pages before a 503.")
    shed_wait_s: float | None = Field(
        10.0,
        gt=0,
        description="A new request whose predicted start (the queue ahead of it over its "
        "measured drain rate, rap.serving.shedding) is further away than this is refused at "
        "once: a 503 `overloaded` with Retry-After, which the router tries on another replica. "
        "It bounds the backlog a burst leaves; None queues every request up to max_wait_s.",
    )
    max_waiting: int = Field(256, ge=1, description="Queue length above which requests get 503.")
    max_pending_events: int = Field(
        256,
        ge=1,
        description="Events a request's client may leave unread before its row sits out steps "
        "(keeping its pages): a slow reader must not make the replica hold its whole output.",
    )
    client_stall_s: float = Field(
        30.0,
        gt=0,
        description="A row whose client leaves max_pending_events unread this long is cancelled "
        "and its pages freed at the next step.",
    )
    grow_after_s: float = Field(
        5.0,
        ge=0,
        description="Seconds the budget must allow a larger mask before blocks are restored "
        "(shrinks are immediate): hysteresis against thrash.",
    )
    restore_patience: float = Field(
        2.0,
        ge=0,
        description="A grow also waits until the budget has held for this many times its "
        "restore's predicted copy time (measured rate of the last restore read).",
    )
    follow_budget: bool = Field(
        True,
        description="False: mask and KV pool are sized once, for the budget at start, and later "
        "budgets (an operator's, the controller's) change nothing: what a server with a fixed "
        "gpu_memory_utilization does (the `dense-high` and `dense-low` baselines of rap bench).",
    )
    static_mask: str | None = Field(
        None,
        pattern=r"^([am][0-9]+(,[am][0-9]+)*)?$",
        description="Dropped blocks (`a3,m10`) of a mask the replica runs at most, all the time: "
        "its ceiling from the start (the `static` baseline: one pruned model); None: none.",
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="max_tokens of a chat request that names none. None: up to the context as "
        "far as the KV pool holds one row (OpenAI's default is the context); such a row "
        "reserves its pages at admission (invariant 2), so a server that takes many of them "
        "at once sets a number here.",
    )

    cuda_graphs: bool = Field(
        False,
        description="On a GPU, replay decode steps from CUDA graphs (rap.serving.decode_graphs): "
        "a graph per decoder layer, batch size and page span, captured on first use. Off by "
        "default: the graphs' memory pool is not in the memory model yet (invariant 2), so a "
        "replica with graphs can hold more than its budget says.",
    )

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_running=self.max_batch_size,
            max_step_tokens=self.max_step_tokens,
            page_tokens=self.page_tokens,
            max_wait_s=self.max_wait_s,
            shed_wait_s=self.shed_wait_s,
            retry_after_s=self.retry_after_s,
            client_stall_s=self.client_stall_s,
            cuda_graphs=self.cuda_graphs,
        )
