"""A pool that shrinks gives its bytes back to the OS (rap.serving.kv_pages): a dropped layer's
slabs and a cut pool's old slabs leave the process's mappings (`/proc/self/smaps`)."""

from __future__ import annotations

import pytest
import torch

from rap.serving.kv_pages import PagePool, RowPages
from tests.core.test_release import _mapping_of, _mappings


def _gone(mapping) -> bool:
    return not any(m.same(mapping) for m in _mappings())


def test_dropped_layers_and_cut_pools_leave_the_process_every_time() -> None:
    """From malloc, only the first freed slab left: glibc then raised its mmap threshold and
    later slabs came from, and went back to, its heap."""
    pool = PagePool([0, 1, 2], 256, 16, 4, 64, torch.float32)  # 4 MiB a slab
    for _ in range(3):
        mapped = _mapping_of(pool.keys[1])
        assert mapped is not None and mapped.hi - mapped.lo == pool.keys[1].numel() * 4
        pool.drop_layer(1)
        assert _gone(mapped)
        pool.add_layer(1)
    row = RowPages()
    for _ in range(3):
        pool.write(0, row, torch.ones(16, 4, 64), torch.ones(16, 4, 64))
    before = [_mapping_of(pool.keys[layer]) for layer in pool.layers]
    pool.resize(64, [{0: row}])
    assert all(_gone(m) for m in before)
    assert pool.keys[0].shape[0] == 64 and len(row.pages) == 3
    assert torch.equal(pool.keys[0][row.pages[0]], torch.ones(16, 4, 64))  # rows' pages kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_dropped_and_cut_slabs_leave_the_allocators_reserve() -> None:
    """What other tenants see: `memory_reserved` falls, not only `memory_allocated`."""
    # Other gpu tests of the same process leave tensors and cached blocks behind (on an H100,
    # 30 MiB of slack before this test began): measure this test's own slack only.
    torch.cuda.empty_cache()
    slack = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    pool = PagePool([0, 1], 1024, 16, 8, 128, torch.float16, device="cuda")  # 32 MiB a slab
    reserved = torch.cuda.memory_reserved()
    pool.drop_layer(1)
    assert torch.cuda.memory_reserved() <= reserved - 2 * 32 * 2**20
    reserved, allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    pool.resize(256, [])
    assert torch.cuda.memory_allocated() == allocated - 2 * 24 * 2**20
    # The two new 8 MiB slabs share one of the allocator's 20 MiB segments (requests of 1-10
    # MiB are served from such segments), so 44 of the 48 MiB cut leave its reserve (seen on
    # an H200: 64 → 20 MiB); what it keeps beyond live tensors is under one segment.
    assert torch.cuda.memory_reserved() <= reserved - 40 * 2**20
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() - slack < 20 * 2**20
