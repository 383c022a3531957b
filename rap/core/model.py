"""PrunableModel: a causal LM whose attention and MLP blocks drop and return at run time.

A decoder layer computes `h = x + post(branch(pre(x)))` for its attention and its MLP branch.
Dropping a block swaps its pre-norm and post-norm for `Passthrough` and its branch for
`DroppedBranch`, which contributes an exact zero: the sum is `x`, which is what the model computes
with the block deleted. The original modules are kept aside (their weights released by the
`BlockStore`) and swapped back on restore. The model's own code is never copied or edited.

A generation holds the mask it started with until its last token (invariant 1): `apply` waits
for a running generation to finish.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteriaList

from rap.core import memory
from rap.core.arch import ArchSpec, Dims, dims_of, spec_for
from rap.core.cache import MaskedCache
from rap.core.errors import MaskBusyError, MaskError, RapError
from rap.core.masks import KeepMask, layer_blocks
from rap.core.weights import BlockStore, SafetensorsSource, live_weight_bytes


class Passthrough(nn.Module):
    """Stands in for a dropped block's norms: returns its input."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class DroppedBranch(nn.Module):
    """Stands in for a dropped branch: its contribution to the residual sum is an exact zero.

    A 0-d zero broadcasts in `residual + branch`, so no activation-sized tensor is allocated.
    Attention modules return `(output, weights)`, MLPs a tensor; this mirrors whichever it replaces.
    """

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        zero = hidden_states.new_zeros(())
        return (zero, None) if self.returns_tuple else zero


@dataclass
class MaskChange:
    """What applying a mask did: bytes freed and bytes brought back, blocks each way."""

    released_bytes: int = 0
    restored_bytes: int = 0
    dropped: list[tuple[str, int]] = field(default_factory=list)
    restored: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Generation:
    """Output of one batch: new token ids per row, the mask that served it, KV bytes used."""

    token_ids: list[list[int]]
    mask: KeepMask
    kv_bytes: int
    texts: list[str] = field(default_factory=list)


class PrunableModel:
    """A loaded causal LM plus its keep-mask, block store and tokenizer."""

    def __init__(
        self,
        hf_model: nn.Module,
        model_id: str,
        source: SafetensorsSource | None,
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.hf: Any = hf_model.eval()  # a transformers PreTrainedModel
        self.config = hf_model.config
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.spec: ArchSpec = spec_for(self.config)
        self.dims: Dims = dims_of(self.config)
        self.device = torch.device(device)
        self.dtype: torch.dtype = next(hf_model.parameters()).dtype
        self.store = BlockStore(hf_model, self.spec, source)
        self.store.consolidate(self.device)
        self.hf.to(self.device)
        self._aside: dict[tuple[str, int], list[tuple[str, nn.Module]]] = {}
        self._lock = threading.Lock()
        self.active_cache: MaskedCache | None = None
        self.mask = KeepMask.dense(model_id, self.dims.num_layers)

    # -- masks ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.dims.num_layers

    def dense_mask(self) -> KeepMask:
        return KeepMask.dense(self.model_id, self.num_layers)

    def fetch_restores(self, mask: KeepMask) -> dict[tuple[str, int], torch.Tensor]:
        """The bytes of every block `mask` would restore, read into new buffers without
        touching the model (`BlockStore.fetch`): run it beside the steps, then pass the result
        to `apply`, whose restores then only bind them."""
        aside = [b for b in layer_blocks(self.num_layers) if mask.keeps(b) and b in self._aside]
        return {b: self.store.fetch(*b, self.device, self.dtype) for b in aside}

    def apply(
        self,
        mask: KeepMask,
        timeout_s: float | None = None,
        fetched: dict[tuple[str, int], torch.Tensor] | None = None,
    ) -> MaskChange:
        """Make `mask` current: release dropped blocks, reload kept ones. Waits for a running
        generation (its mask holds to its last token); `MaskBusyError` after `timeout_s`.

        Every drop comes before any restore, so the weights never exceed the larger of the two
        masks. If a restore fails, the blocks restored so far are dropped again and `self.mask`
        becomes the blocks that really run (the old mask minus the new drops), then the error
        propagates."""
        mask.check_for(self.model_id, self.num_layers)
        if mask.version < self.mask.version:
            raise MaskError(
                f"mask version {mask.version} is older than the current {self.mask.version}",
                expected="a version at or above the current one",
            )
        if not self._lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            raise MaskBusyError(
                f"a generation held the mask for more than {timeout_s} s",
                fix="retry after the running batch ends",
            )
        try:
            change = MaskChange()
            for block in layer_blocks(self.num_layers):
                if not mask.keeps(block) and block not in self._aside:
                    change.released_bytes += self._drop_block(*block)
                    change.dropped.append(block)
            for block in layer_blocks(self.num_layers):
                if mask.keeps(block) and block in self._aside:
                    try:
                        buf = fetched.pop(block, None) if fetched else None
                        change.restored_bytes += (
                            self._restore_block(*block) if buf is None else self._bind(block, buf)
                        )
                    except BaseException:
                        self._roll_back(change, mask)
                        raise
                    change.restored.append(block)
            self.mask = mask
            return change
        finally:
            self._lock.release()

    def _roll_back(self, change: MaskChange, mask: KeepMask) -> None:
        """A restore failed: drop what this change restored, report the blocks that run."""
        for block in change.restored:
            self._drop_block(*block)
        kept = [block not in self._aside for block in layer_blocks(self.num_layers)]
        self.mask = KeepMask(
            model=self.model_id,
            version=mask.version,
            source=mask.source,
            attn=tuple(kept[0::2]),
            mlp=tuple(kept[1::2]),
        )

    def restore(self) -> MaskChange:
        """Back to the dense model (a user mask at the current version)."""
        return self.apply(self.dense_mask().model_copy(update={"version": self.mask.version}))

    def _drop_block(self, kind: str, layer: int) -> int:
        module = self.spec.layers(self.hf)[layer]
        parts = self.spec.block_parts(kind)
        self._aside[(kind, layer)] = [(name, getattr(module, name)) for name in parts]
        branch = parts[-1]
        for name in parts:
            stand_in = (
                DroppedBranch(returns_tuple=kind == "attn") if name == branch else Passthrough()
            )
            setattr(module, name, stand_in)
        return self.store.release(kind, layer)

    def _restore_block(self, kind: str, layer: int) -> int:
        return self._bind((kind, layer), None)

    def _bind(self, block: tuple[str, int], buf: torch.Tensor | None) -> int:
        """Put a block back: bind a buffer read beforehand, or read it now."""
        kind, layer = block
        if buf is not None:
            nbytes = self.store.bind(kind, layer, buf)
        else:
            nbytes = self.store.reload(kind, layer, self.device, self.dtype)
        module = self.spec.layers(self.hf)[layer]
        for name, original in self._aside.pop((kind, layer)):
            setattr(module, name, original)
        return nbytes

    # -- memory ---------------------------------------------------------------------------
    def kv_bytes_in_use(self) -> int:
        """Bytes the running generation's KV cache holds now (0 when idle)."""
        cache = self.active_cache
        return cache.kv_bytes() if cache is not None else 0

    def weight_bytes(self) -> int:
        """Bytes of parameters resident now (measured from the tensors)."""
        return live_weight_bytes(self.hf)

    def predicted_weight_bytes(self, mask: KeepMask | None = None) -> int:
        return memory.weight_bytes(self.config, mask or self.mask, self.dtype)

    def predicted_kv_bytes(self, batch: int, seq: int, mask: KeepMask | None = None) -> int:
        return memory.kv_bytes(self.config, mask or self.mask, batch, seq, self.dtype)

    # -- generation -----------------------------------------------------------------------
    def new_cache(self, mask: KeepMask) -> MaskedCache | None:
        """A cache for `mask`; None when no attention layer is kept (nothing to cache)."""
        return MaskedCache(self.config, mask.attn) if any(mask.attn) else None

    def pad_id(self) -> int:
        pad = getattr(self.config, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.config, "eos_token_id", None)
        if isinstance(pad, list):
            pad = pad[0]
        return int(pad) if pad is not None else 0

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        streamer: Any = None,
        stop_at_eos: bool = True,
        stopping_criteria: Sequence[Any] = (),
        sampling: dict[str, Any] | None = None,
    ) -> Generation:
        """Generation for a batch of token-id prompts, left-padded, under one mask: greedy, or
        sampled with `sampling` (do_sample, temperature, top_p)."""
        with self._lock:
            mask = self.mask
            cache = self.new_cache(mask)
            self.active_cache = cache  # read by telemetry while the batch runs
            try:
                out, width = self._run_generate(
                    prompts,
                    max_new_tokens,
                    cache,
                    stop_at_eos,
                    streamer,
                    stopping_criteria,
                    sampling,
                )
            finally:
                self.active_cache = None
            eos_ids = self.eos_ids() if stop_at_eos else set()
            rows = [_trim(row, eos_ids) for row in out[:, width:].tolist()]
            kv = cache.kv_bytes() if cache is not None else 0
            return Generation(token_ids=rows, mask=mask, kv_bytes=kv)

    @contextlib.contextmanager
    def holding_mask(self) -> Iterator[KeepMask]:
        """The current mask, held for the block: `apply` waits until it ends (one engine step
        runs under one mask)."""
        with self._lock:
            yield self.mask

    def eos_ids(self) -> set[int]:
        eos = getattr(self.config, "eos_token_id", None)
        return {eos} if isinstance(eos, int) else set(eos or [])

    def _run_generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        cache: MaskedCache | None,
        stop_at_eos: bool,
        streamer: Any,
        stopping_criteria: Sequence[Any],
        sampling: dict[str, Any] | None,
    ) -> tuple[torch.Tensor, int]:

        width = max(len(p) for p in prompts)
        pad = self.pad_id()
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.hf.generate(
                input_ids=ids.to(self.device),
                attention_mask=attn.to(self.device),
                past_key_values=cache,
                use_cache=cache is not None,
                **(sampling or {"do_sample": False}),
                max_new_tokens=max_new_tokens,
                min_new_tokens=0 if stop_at_eos else max_new_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(self.eos_ids()) if stop_at_eos else None,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList(stopping_criteria),
            )
        return out, width

    def encode(self, text: str | list[dict[str, str]], chat: bool = True) -> list[int]:
        """Token ids of a prompt, or of chat messages rendered by the model's chat template;
        a plain string with `chat` is sent as one user message if the model has a template."""
        if self.tokenizer is None:
            raise RapError(
                f"model {self.model_id} has no tokenizer, so it cannot take text",
                expected="a model folder with tokenizer files",
                fix="pass token ids (generate_ids) or use a model with a tokenizer",
            )
        if isinstance(text, str) and chat and getattr(self.tokenizer, "chat_template", None):
            text = [{"role": "user", "content": text}]
        templated = isinstance(text, list)
        if templated:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RapError(
                    f"model {self.model_id} has no chat template",
                    fix="use /v1/completions with a plain prompt",
                )
            text = self.tokenizer.apply_chat_template(
                text, tokenize=False, add_generation_prompt=True
            )
        # A rendered chat template already holds its special tokens.
        return list(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 32, chat: bool = True
    ) -> Generation:
        """Greedy generation for text prompts (chat-templated unless `chat=False`)."""
        result = self.generate_ids([self.encode(p, chat) for p in prompts], max_new_tokens)
        result.texts = [self.decode(r) for r in result.token_ids]
        return result


def _trim(row: list[int], eos_ids: set[int]) -> list[int]:
    """Cut a generated row after its first end-of-sequence token (kept): later ids are padding."""
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[: i + 1]
    return row
