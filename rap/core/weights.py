"""Block weights that can really leave memory and come back bit for bit (invariant 3).

Each block's parameters live in one contiguous buffer, the parameters being views into it, so
that dropping a block is a single free. On a CPU the buffer is a memory mapping of its own
(`cpu_block_buffer`), unmapped on release, and on restore re-read
from the model's safetensors file (converted to the serving dtype exactly as loading does). On a
GPU it moves to pinned host memory and back, and `torch.cuda.empty_cache()` returns the freed
pages to the device.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from rap.core.arch import ArchSpec


def cpu_block_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of `numel` elements in a shared anonymous mapping of its own (`mmap`),
    unmapped when the last view of it dies, so that dropping a block returns its pages to the OS.
    Shared, not private: each such mapping is its own shmem object, never merged with a
    neighbour, so `/proc/self/maps` shows every block buffer as one line of its own.

    Why not `torch.empty`: torch takes CPU memory from glibc's malloc, which serves a large
    request from free space already in its heap when it has some (chunks freed earlier in the
    process, e.g. while glibc's dynamic mmap threshold was raised to 32 MiB), and a free puts it
    back there: RSS does not move. Whether that happens depends on every allocation before it
    (a test suite's order), which made the release tests flaky. A mapping of our own makes
    "freed" mean "gone from /proc/self/maps" by construction.
    """
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    # frombuffer holds the mapping alive through the tensor's storage; the mapping is closed
    # (munmap) when the storage is freed.
    return torch.frombuffer(mapping, dtype=dtype, count=numel)


@dataclass
class BlockSlot:
    """One block's parameters and where their bytes are right now."""

    kind: str
    layer: int
    params: list[tuple[str, nn.Parameter, torch.Size]]
    numel: int
    buffer: torch.Tensor | None = None
    host: torch.Tensor | None = field(default=None, repr=False)

    @property
    def resident(self) -> bool:
        return self.buffer is not None


class SafetensorsSource:
    """Reads named tensors from the safetensors files of a model folder."""

    def __init__(self, folder: Path) -> None:

        self.folder = folder
        self.index: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    self.index[name] = path
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())

    def covers(self, names_shapes: list[tuple[str, torch.Size]]) -> bool:
        return all(self.shapes.get(n) == tuple(s) for n, s in names_shapes)

    def read_into(self, targets: list[tuple[str, torch.Tensor]]) -> None:
        """Copy each named tensor into its target view (dtype conversion as `Tensor.copy_`)."""

        by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        for name, view in targets:
            by_file.setdefault(self.index[name], []).append((name, view))
        for path, items in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name, view in items:
                    view.copy_(f.get_tensor(name))


class BlockStore:
    """Owns every block's buffer: consolidates at load, releases and reloads on demand."""

    def __init__(self, model: nn.Module, spec: ArchSpec, source: SafetensorsSource | None) -> None:
        self.model = model
        self.spec = spec
        self.source = source
        self.slots: dict[tuple[str, int], BlockSlot] = {}
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        for layer_idx, layer in enumerate(spec.layers(model)):
            for kind in ("attn", "mlp"):
                params = [
                    (names[id(p)], p, p.shape)
                    for part in spec.block_parts(kind)
                    for p in getattr(layer, part).parameters()
                ]
                numel = sum(p.numel() for _, p, _ in params)
                self.slots[(kind, layer_idx)] = BlockSlot(kind, layer_idx, params, numel)

    def consolidate(self, device: torch.device) -> None:
        """Move every block into one contiguous buffer on `device` (parameters become views)."""
        for slot in self.slots.values():
            buf = _new_buffer(slot.numel, slot.params[0][1].dtype, device)
            for view, (_, p, _) in zip(self._views(slot, buf), slot.params, strict=True):
                view.copy_(p.data)
            self._bind(slot, buf)
        if self.source is not None and not all(
            self.source.covers([(n, s) for n, _, s in slot.params]) for slot in self.slots.values()
        ):
            self.source = None  # file names differ from the model's: keep dropped CPU blocks

    def release(self, kind: str, layer: int) -> int:
        """Free a block's buffer; returns the bytes freed on the model's device."""
        slot = self.slots[(kind, layer)]
        if slot.buffer is None:
            return 0
        buf = slot.buffer
        nbytes = buf.numel() * buf.element_size()
        if buf.device.type != "cpu":
            slot.host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
            slot.host.copy_(buf)
        elif self.source is None:
            slot.host = buf.clone()  # no file to re-read from: the bytes stay in host memory
        for _, p, _ in slot.params:
            p.data = torch.empty(0, dtype=buf.dtype, device=buf.device)
        slot.buffer = None
        del buf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return nbytes

    def reload(self, kind: str, layer: int, device: torch.device, dtype: torch.dtype) -> int:
        """Bring a block back, bit-identical to what was loaded; returns the bytes allocated."""
        if self.slots[(kind, layer)].buffer is not None:
            return 0
        return self.bind(kind, layer, self.fetch(kind, layer, device, dtype))

    def fetch(
        self, kind: str, layer: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """A dropped block's bytes in a new buffer, not yet bound to the model: the slow half of
        a restore (a file read or a host→device copy), safe to run beside the model's steps."""
        slot = self.slots[(kind, layer)]
        buf = _new_buffer(slot.numel, dtype, device)
        if slot.host is not None:
            buf.copy_(slot.host)
        else:
            assert self.source is not None
            views = self._views(slot, buf)
            self.source.read_into([(n, v) for (n, _, _), v in zip(slot.params, views, strict=True)])
        return buf

    def bind(self, kind: str, layer: int, buf: torch.Tensor) -> int:
        """Make a fetched buffer the block's parameters (the fast half); returns its bytes."""
        slot = self.slots[(kind, layer)]
        slot.host = None
        self._bind(slot, buf)
        return buf.numel() * buf.element_size()

    @staticmethod
    def _views(slot: BlockSlot, buf: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for _, _, shape in slot.params:
            n = shape.numel()
            views.append(buf[offset : offset + n].view(shape))
            offset += n
        return views

    def _bind(self, slot: BlockSlot, buf: torch.Tensor) -> None:
        for view, (_, p, _) in zip(self._views(slot, buf), slot.params, strict=True):
            p.data = view
        slot.buffer = buf


def _new_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return cpu_block_buffer(numel, dtype)
    return torch.empty(numel, dtype=dtype, device=device)


def live_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as they are now (shared storages counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.numel() == 0 or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (for bit-identity checks)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(json.dumps([name, str(p.dtype), list(p.shape)]).encode())
        if p.numel():
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
