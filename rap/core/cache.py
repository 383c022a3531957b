"""A KV cache that knows which attention layers a mask dropped.

A dropped attention layer never calls `update`, so its cache layer stays empty: zero bytes.
transformers answers the cache's length from layer 0 (`get_seq_length()`) and the attention
mask's sizes from layer 0 or the first full-attention layer (`get_mask_sizes(q, layer_idx)`).
When that layer is dropped it answers 0, positions restart and left-padded batches get a wrong
mask (a trap of dropping layers). This cache answers those questions from a kept layer of the
same kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers.cache_utils import DynamicCache


class MaskedCache(DynamicCache):
    """`DynamicCache` whose length and mask sizes come from kept attention layers only."""

    def __init__(self, config: Any, kept_attn: Sequence[bool]) -> None:
        super().__init__(config=config)
        if not any(kept_attn):
            raise ValueError("a MaskedCache needs at least one kept attention layer")
        self.kept_attn = tuple(kept_attn)
        sliding = [bool(getattr(layer, "is_sliding", False)) for layer in self.layers]
        first_kept = self.kept_attn.index(True)
        self._answer: list[int] = []
        for i, is_sliding in enumerate(sliding):
            same_kind = [j for j, k in enumerate(self.kept_attn) if k and sliding[j] == is_sliding]
            self._answer.append(i if self.kept_attn[i] else (same_kind or [first_kept])[0])

    def _kept_layer(self, layer_idx: int) -> int:
        return self._answer[layer_idx] if layer_idx < len(self._answer) else layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._kept_layer(layer_idx))

    def get_mask_sizes(self, query_length: Any, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._kept_layer(layer_idx))

    def kv_bytes(self) -> int:
        """Bytes of the key and value tensors the cache holds now."""
        total = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def layers_holding(self) -> list[int]:
        """Indices of layers whose cache holds at least one tensor element."""
        held = []
        for i, layer in enumerate(self.layers):
            keys = getattr(layer, "keys", None)
            if keys is not None and keys.numel() > 0:
                held.append(i)
        return held
