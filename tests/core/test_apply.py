"""A mask switch drops before it restores, and a failed restore leaves a true mask."""

from __future__ import annotations

import pytest

import rap
from rap.core import memory
from rap.core.masks import KeepMask
from rap.core.weights import live_weight_bytes


def _watch(model, seen: list[int]) -> None:
    """Record the model's live weight bytes after every drop and restore."""
    drop, restore = model._drop_block, model._restore_block

    def dropped(*block):
        out = drop(*block)
        seen.append(live_weight_bytes(model.hf))
        return out

    def restored(*block):
        out = restore(*block)
        seen.append(live_weight_bytes(model.hf))
        return out

    model._drop_block, model._restore_block = dropped, restored


def test_a_switch_never_holds_more_than_the_larger_mask(tiny_dirs) -> None:
    model = rap.load_model(str(tiny_dirs["llama"]), device="cpu")
    a = KeepMask.from_drops(model.model_id, 4, drop_mlp="0,1")
    b = KeepMask.from_drops(model.model_id, 4, drop_mlp="2,3")
    model.apply(a)
    seen: list[int] = []
    _watch(model, seen)
    model.apply(b)
    larger = max(memory.weight_bytes(model.config, m, model.dtype) for m in (a, b))
    assert seen and max(seen) <= larger  # restoring first would hold all 4 MLPs at once
    assert model.mask == b


def test_a_failed_restore_rolls_back_to_the_blocks_that_run(tiny_dirs) -> None:
    model = rap.load_model(str(tiny_dirs["llama"]), device="cpu")
    model.apply(KeepMask.from_drops(model.model_id, 4, drop_mlp="0,1"))
    restore, calls = model._restore_block, []

    def flaky(kind: str, layer: int) -> int:
        calls.append((kind, layer))
        if len(calls) == 2:
            raise OSError("disk gone")
        return restore(kind, layer)

    model._restore_block = flaky
    with pytest.raises(OSError, match="disk gone"):
        model.apply(KeepMask.from_drops(model.model_id, 4, drop_mlp="2"))
    running = [(k, i) for i in range(4) for k in ("attn", "mlp") if (k, i) not in model._aside]
    assert model.mask.kept_blocks() == running  # the reported mask is what runs
    assert model.mask.dropped_mlp == [0, 1, 2]  # the new drop stays, the restores undone
    assert live_weight_bytes(model.hf) == memory.weight_bytes(model.config, model.mask, model.dtype)


def test_blocks_read_beforehand_bind_bit_identical(tiny_dirs) -> None:
    """The slow half of a restore (`fetch_restores`) runs apart from `apply`, whose restores
    then only bind the buffers read: the weights are the loaded ones, bit for bit."""
    import torch

    model = rap.load_model(str(tiny_dirs["llama"]), device="cpu")
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    model.apply(KeepMask.from_drops(model.model_id, 4, drop_attn="1", drop_mlp="0,2"))
    fetched = model.fetch_restores(model.dense_mask())
    assert set(fetched) == {("attn", 1), ("mlp", 0), ("mlp", 2)}
    reads: list[tuple] = []
    model.store.reload = lambda *a: reads.append(a) or 0  # apply must not read again
    model.apply(model.dense_mask(), fetched=fetched)
    assert not reads and not fetched  # every buffer was bound
    for n, p in model.hf.named_parameters():
        assert torch.equal(p, before[n]), n
