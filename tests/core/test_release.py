"""Invariant 3: dropping a block frees its memory for real; restoring is bit-identical.

On a CPU "frees for real" means: each block's buffer is a mapping of its own (a shmem object,
named by its inode), fully resident, and dropping the block removes that mapping from the
process (`/proc/self/smaps`). Unlike the process's total RSS, which every other allocation in
the process moves (the old RSS test failed at random in suite order), nothing else can change
whether one particular mapping exists.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch

import rap
from rap.core import memory
from rap.core.masks import KeepMask
from rap.core.weights import cpu_block_buffer, weights_digest
from tests.tiny import save_big_llama

PAGE = 4096


@dataclass(frozen=True)
class Mapping:
    lo: int
    hi: int
    inode: int
    rss_bytes: int = 0

    def same(self, other: Mapping) -> bool:
        return (self.lo, self.hi, self.inode) == (other.lo, other.hi, other.inode)


def _mappings() -> list[Mapping]:
    """Every mapping of this process with its resident bytes (`/proc/self/smaps`)."""
    gc.collect()
    out: list[Mapping] = []
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                out.append(Mapping(lo, hi, int(head[4])))
            elif head[0] == "Rss:":
                m = out[-1]
                out[-1] = Mapping(m.lo, m.hi, m.inode, int(head[1]) * 1024)
    return out


def _mapping_of(tensor: torch.Tensor) -> Mapping | None:
    ptr = tensor.data_ptr()
    return next((m for m in _mappings() if m.lo <= ptr < m.hi), None)


def _own_resident_mapping(tensor: torch.Tensor) -> Mapping:
    """The tensor's buffer is the whole of one mapping, and every page of it is resident."""
    nbytes = tensor.numel() * tensor.element_size()
    m = _mapping_of(tensor)
    assert m is not None
    assert m.lo == tensor.data_ptr() and m.hi - m.lo == -(-nbytes // PAGE) * PAGE, (m, nbytes)
    assert m.rss_bytes == m.hi - m.lo, m
    return m


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    return save_big_llama(tmp_path_factory.mktemp("big"))


def test_a_block_buffer_is_a_mapping_that_leaves_when_freed() -> None:
    buf = cpu_block_buffer(3 * 2**20 + 5, torch.float32)
    buf.fill_(1.0)
    view = buf[7:19].view(3, 4)
    mapped = _own_resident_mapping(buf)
    del buf
    kept = _mapping_of(view)
    assert kept is not None and kept.same(mapped)  # a live view keeps the bytes
    del view
    assert not any(m.same(mapped) for m in _mappings())


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_cpu_drop_unmaps_each_block_and_restore_is_bit_identical(kind: str, big_dir) -> None:
    model = rap.load_model(str(big_dir), device="cpu")
    block = memory.block_bytes(model.config, kind, model.dtype)
    assert block >= 16 * 2**20
    digest = weights_digest(model.hf)
    dense = model.dense_mask()
    dropped = KeepMask.from_drops(model.model_id, 2, **{f"drop_{kind}": "0-1"})
    slots = [model.store.slots[(kind, layer)] for layer in (0, 1)]
    for _cycle in range(3):
        held = [_own_resident_mapping(s.buffer) for s in slots]  # type: ignore[arg-type]
        assert sum(m.rss_bytes for m in held) >= 2 * block
        model.apply(dropped)
        assert all(s.buffer is None and s.host is None for s in slots)
        left = _mappings()
        assert not [m for m in held if any(m.same(x) for x in left)], "a dropped block is mapped"
        model.apply(dense)
        restored = [_own_resident_mapping(s.buffer) for s in slots]  # type: ignore[arg-type]
        assert sum(m.rss_bytes for m in restored) >= 2 * block
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
