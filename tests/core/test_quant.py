"""Block weights at int8 and int4 (rap.core.quant): error within half a step, the same bytes
every time, int4 only from full precision, and bytes as predicted from the shape alone."""

from __future__ import annotations

import pytest
import torch

from rap.core.quant import (
    INT4_LEVELS,
    INT8_MAX,
    QuantError,
    int4_weight_bytes,
    int8_weight_bytes,
    quantize_int4,
    quantize_int8,
)


def weight(out: int = 48, width: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g) * torch.linspace(0.01, 3.0, out)[:, None]
    w[5] = 0.0  # a dead row
    w[7, :128] = 0.25  # a constant group
    return w


def test_int8_is_symmetric_per_output_row_and_within_half_a_step() -> None:
    w = weight()
    q = quantize_int8(w)
    assert q.data.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert q.scale.shape == (w.shape[0],)
    assert int(q.data.abs().max()) <= INT8_MAX
    assert torch.equal(
        q.data.abs().amax(dim=1)[[0, 10, 47]], torch.full((3,), 127, dtype=torch.int8)
    )
    err = (q.dequantize() - w).abs()
    assert bool((err <= q.scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(q.dequantize()[5], torch.zeros(w.shape[1]))  # a dead row stays dead


def test_int4_is_asymmetric_per_group_and_within_half_a_step() -> None:
    w = weight()
    q = quantize_int4(w, group_size=64)
    levels = q.levels()
    assert levels.shape == w.shape and int(levels.max()) <= INT4_LEVELS
    assert q.scale.shape == q.low.shape == (w.shape[0], w.shape[1] // 64)
    err = (q.dequantize() - w).abs().reshape(w.shape[0], -1, 64)
    assert bool((err <= q.scale[..., None] / 2 + 1e-6).all())
    assert torch.allclose(q.dequantize()[7, :128], torch.full((128,), 0.25))  # constant group
    # Each group spans its own range: the smallest and largest value are represented exactly.
    grouped = w.reshape(w.shape[0], -1, 64)
    back = q.dequantize().reshape(w.shape[0], -1, 64)
    assert torch.allclose(back.amin(dim=-1), grouped.amin(dim=-1), atol=1e-6)
    assert torch.allclose(back.amax(dim=-1), grouped.amax(dim=-1), atol=1e-5)


def test_the_nibbles_are_packed_low_first() -> None:
    w = torch.tensor([[0.0, 15.0, 1.0, 14.0]])  # one group of 4: scale 1, minimum 0
    q = quantize_int4(w, group_size=4)
    assert q.packed.tolist() == [[0xF0, 0xE1]]
    assert q.levels().tolist() == [[0, 15, 1, 14]]


def test_the_same_weights_give_the_same_bytes_whatever_their_dtype_or_copy() -> None:
    w = weight().to(torch.bfloat16)  # values a bfloat16 holds exactly
    for quantize in (quantize_int8, quantize_int4):
        a, b = quantize(w), quantize(w.clone().to(torch.float32))
        assert all(
            torch.equal(getattr(a, f), getattr(b, f))
            for f in a.__dataclass_fields__
            if isinstance(getattr(a, f), torch.Tensor)
        )


def test_int4_is_made_from_full_precision_only() -> None:
    """An int8 buffer is refused: int4 from int8 would round twice, and its bytes would depend
    on the path taken to it."""
    with pytest.raises(QuantError, match="full-precision"):
        quantize_int4(quantize_int8(weight()).data)
    with pytest.raises(QuantError, match="divides 256"):
        quantize_int4(weight(), group_size=96)
    with pytest.raises(QuantError, match="2-D"):
        quantize_int8(torch.ones(4))


@pytest.mark.parametrize(("out", "width", "group"), [(48, 256, 128), (576, 1536, 64), (3, 32, 32)])
def test_bytes_are_predicted_from_the_shape(out: int, width: int, group: int) -> None:
    w = torch.randn(out, width)
    assert quantize_int8(w).nbytes == int8_weight_bytes(out, width)
    assert quantize_int4(w, group).nbytes == int4_weight_bytes(out, width, group)
    if width >= 256:  # the scales are a small share of a real linear's bytes
        full = out * width * 2  # float16
        assert int8_weight_bytes(out, width) < full / 1.9
        assert int4_weight_bytes(out, width, group) < full / 3
