"""Invariant 3: dropping a block frees its memory for real; restoring is bit-identical."""

from __future__ import annotations

import gc

import pytest
import torch

import rap
from rap import memory
from rap.masks import KeepMask
from rap.weights import weights_digest
from tests.tiny import save_big_llama


def _rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    return save_big_llama(tmp_path_factory.mktemp("big"))


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_cpu_drop_lowers_rss_and_restore_is_bit_identical(kind: str, big_dir) -> None:
    model = rap.load_model(str(big_dir), device="cpu")
    block = memory.block_bytes(model.config, kind, model.dtype)
    assert block >= 16 * 2**20
    digest = weights_digest(model.hf)
    dense = model.dense_mask()
    dropped = KeepMask.from_drops(model.model_id, 2, **{f"drop_{kind}": "0-1"})
    for _cycle in range(3):
        before = _rss_bytes()
        model.apply(dropped)
        after_drop = _rss_bytes()
        assert abs((before - after_drop) - 2 * block) <= 0.05 * 2 * block, (before, after_drop)
        model.apply(dense)
        after_restore = _rss_bytes()
        assert abs((after_restore - after_drop) - 2 * block) <= 0.05 * 2 * block
        assert weights_digest(model.hf) == digest


def test_restore_without_a_matching_file_keeps_host_copy(big_dir, tmp_path) -> None:
    """If the file's names differ from the model's, dropped CPU blocks stay in host memory."""
    model = rap.load_model(str(big_dir), device="cpu")
    model.store.source = None
    digest = weights_digest(model.hf)
    model.apply(KeepMask.from_drops(model.model_id, 2, drop_mlp="0"))
    model.restore()
    assert weights_digest(model.hf) == digest


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_gpu_drop_frees_device_memory(kind: str, big_dir) -> None:
    model = rap.load_model(str(big_dir), device="cuda", dtype="float16")
    block = memory.block_bytes(model.config, kind, model.dtype)
    digest = weights_digest(model.hf)
    dropped = KeepMask.from_drops(model.model_id, 2, **{f"drop_{kind}": "0-1"})
    for _cycle in range(3):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        model.apply(dropped)
        after_drop = torch.cuda.memory_allocated()
        assert abs((before - after_drop) - 2 * block) <= 0.05 * 2 * block
        assert all(
            slot.host is None or slot.host.is_pinned() for slot in model.store.slots.values()
        )
        model.apply(model.dense_mask())
        assert abs((torch.cuda.memory_allocated() - after_drop) - 2 * block) <= 0.05 * 2 * block
        assert weights_digest(model.hf) == digest
