"""A block's weight matrices at int8 or int4: the quantized buffers, made from full precision.

    state    what a linear's weight W [out, in] is stored as                    bytes
    full     W in the serving dtype                                             out·in·b
    int8     q ∈ [−127, 127] per element, one float32 scale per output row      out·in + 4·out
             (symmetric: W ≈ q · s_row, s_row = max|W_row| / 127)
    int4     q ∈ [0, 15] per element, two to a byte, and per row and group of   out·in/2
             `group_size` inputs a float32 scale and minimum (asymmetric:       + 8·out·in/g
             W ≈ lo + q · s, s = (max − min) / 15)

The scales are float32 whatever the serving dtype: they are a few bytes a row (a group), and a
half-precision scale would add its own rounding to every element it multiplies. Rounding is
round-half-to-even on float32 values, so the same weights always give the same bytes, on any
machine. A weight is quantized from its full-precision values only: `quantize_int4` refuses an
int8 tensor (int4 from int8 would stack two roundings, and the bytes would depend on the path
that led there).

Both offline models are dequantized 4-bit GGUFs: their weights already lie on a 4-bit grid, so
int4 here costs less than on a model trained in full precision (exactly nothing where the grid
matches, asymmetric groups of 32); every int4 quality figure names its group size and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rap.core.errors import RapError

INT8_MAX = 127
INT4_LEVELS = 15
DEFAULT_GROUP_SIZE = 128
"""Inputs per int4 scale: what torch's int4 CPU and CUDA kernels take (32, 64, 128 or 256)."""
SCALE_BYTES = 4
"""float32 scales and minimums."""


class QuantError(RapError):
    """A weight that cannot be quantized as asked."""


@dataclass(frozen=True)
class Int8Weight:
    """W ≈ data · scale[:, None]: int8 [out, in] and float32 [out]."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.to(torch.float32) * self.scale[:, None]).to(dtype)


@dataclass(frozen=True)
class Int4Weight:
    """W ≈ low + q · scale per group: q packed two to a uint8 [out, in / 2] (even input in the
    low nibble), scale and low float32 [out, in / group_size]."""

    packed: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.low.nbytes

    def levels(self) -> torch.Tensor:
        """q as uint8 [out, in], each in [0, 15]."""
        low_nibble, high_nibble = self.packed & 0x0F, self.packed >> 4
        return torch.stack((low_nibble, high_nibble), dim=-1).reshape(self.packed.shape[0], -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.levels().to(torch.float32)
        out, width = q.shape
        grouped = q.reshape(out, width // self.group_size, self.group_size)
        w = self.low[..., None] + grouped * self.scale[..., None]
        return w.reshape(out, width).to(dtype)


def _full_precision(weight: torch.Tensor, what: str) -> torch.Tensor:
    if weight.dim() != 2:
        raise QuantError(
            f"{what} of a weight of shape {tuple(weight.shape)}",
            "a linear's 2-D weight [out_features, in_features]",
            "quantize each linear's .weight",
        )
    if not weight.is_floating_point():
        raise QuantError(
            f"{what} of a {weight.dtype} tensor",
            "the block's full-precision weights",
            "quantize from the full-precision weights (raise the block to full first)",
        )
    return weight.detach().to(torch.float32)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric int8 with one scale per output row (module doc); an all-zero row gets scale 1."""
    w = _full_precision(weight, "int8")
    peak = w.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
    data = torch.clamp(torch.round(w / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Weight(data.contiguous(), scale.contiguous())


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Weight:
    """Asymmetric int4 per row and group of `group_size` inputs (module doc); a constant group
    gets scale 1 and stores its value as the minimum."""
    w = _full_precision(weight, "int4")
    out, width = w.shape
    if group_size < 2 or group_size % 2 or width % group_size:
        raise QuantError(
            f"int4 groups of {group_size} over {width} inputs",
            "an even group size that divides in_features",
            f"pass a group size that divides {width} (32, 64 or 128 usually do)",
        )
    grouped = w.reshape(out, width // group_size, group_size)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    spread = high - low
    scale = torch.where(spread > 0, spread / INT4_LEVELS, torch.ones_like(spread))
    q = torch.clamp(torch.round((grouped - low[..., None]) / scale[..., None]), 0, INT4_LEVELS)
    q = q.to(torch.uint8).reshape(out, width)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return Int4Weight(packed, scale.contiguous(), low.contiguous(), group_size)


def int8_weight_bytes(out_features: int, in_features: int) -> int:
    """Bytes of `quantize_int8` for a weight of that shape."""
    return out_features * in_features + SCALE_BYTES * out_features


def int4_weight_bytes(
    out_features: int, in_features: int, group_size: int = DEFAULT_GROUP_SIZE
) -> int:
    """Bytes of `quantize_int4` for a weight of that shape."""
    groups = out_features * (in_features // group_size)
    return out_features * in_features // 2 + 2 * SCALE_BYTES * groups
