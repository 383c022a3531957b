"""The memory model's weights and KV equal the tensors' byte counts exactly, every architecture."""

from __future__ import annotations

import pytest
import torch

import rap
from rap.core import memory
from rap.core.masks import KeepMask
from tests.tiny import ARCHS, SLIDING, WINDOW


@pytest.mark.parametrize("arch", ARCHS)
def test_block_and_resident_bytes_equal_tensors(arch: str, tiny_dirs) -> None:
    model = rap.load_model(str(tiny_dirs[arch]), device="cpu")
    cfg, dt = model.config, model.dtype
    for (kind, layer), slot in model.store.slots.items():
        actual = sum(p.numel() * p.element_size() for _, p, _ in slot.params)
        assert actual == memory.block_bytes(cfg, kind, dt), (kind, layer)
    dense = model.weight_bytes()
    assert dense == memory.weight_bytes(cfg, model.mask, dt)
    blocks = sum(memory.block_bytes(cfg, k, dt) for k, _ in model.store.slots)
    assert dense - blocks == memory.resident_bytes(cfg, dt)


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_after_a_mask_equal_prediction(arch: str, tiny_dirs) -> None:
    model = rap.load_model(str(tiny_dirs[arch]), device="cpu")
    n = model.num_layers
    mask = KeepMask.from_drops(model.model_id, n, drop_attn="0,2", drop_mlp=f"1-{n - 1}")
    change = model.apply(mask)
    assert model.weight_bytes() == memory.weight_bytes(model.config, mask, model.dtype)
    assert change.released_bytes == 2 * memory.block_bytes(model.config, "attn", model.dtype) + (
        n - 1
    ) * memory.block_bytes(model.config, "mlp", model.dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_bytes_equal_cache_tensors(arch: str, tiny_dirs) -> None:
    """Counted in the cache after prefill + decode, for lengths below and above the window."""
    model = rap.load_model(str(tiny_dirs[arch]), device="cpu")
    n = model.num_layers
    for mask in (
        model.dense_mask(),
        KeepMask.from_drops(model.model_id, n, drop_attn="0"),
        KeepMask.from_drops(model.model_id, n, drop_attn=f"1-{n - 1}"),
    ):
        model.apply(mask)
        for prompt_len, new in ((2, 1), (3, 4 * WINDOW)):
            prompts = [[5 + i for i in range(prompt_len)]] * 2
            out = model.generate_ids(prompts, new, stop_at_eos=False)
            cached = prompt_len + new - 1  # the last token is sampled, never fed back
            assert out.kv_bytes == memory.kv_bytes(model.config, mask, 2, cached, model.dtype)


def test_dropped_attention_layers_hold_no_cache(tiny_dirs) -> None:
    model = rap.load_model(str(tiny_dirs["gemma3"]), device="cpu")
    mask = KeepMask.from_drops(model.model_id, model.num_layers, drop_attn="0,3,4")
    model.apply(mask)
    cache = model.new_cache(mask)
    with torch.inference_mode():
        model.hf(input_ids=torch.tensor([[4, 5, 6, 7]]), past_key_values=cache, use_cache=True)
    assert cache.layers_holding() == [1, 2, 5]
    for i in (0, 3, 4):
        layer = cache.layers[i]
        assert getattr(layer, "keys", None) is None or layer.keys.numel() == 0


def test_sliding_layers_are_the_configured_ones() -> None:
    from tests.tiny import tiny_config

    for arch in SLIDING:
        windows = memory.dims_of(tiny_config(arch)).windows
        assert WINDOW in windows, arch


def test_budget_and_peak_formulas() -> None:
    from tests.tiny import tiny_config

    cfg = tiny_config("llama")
    dense = memory.dense_mask(cfg)
    full = memory.weight_bytes(cfg, dense, "float16") + memory.kv_bytes(
        cfg, dense, 8, 64, "float16"
    )
    assert memory.budget_bytes(cfg, 0.8, 8, 64, "float16") == int(0.8 * full)
    assert memory.peak_bytes(cfg, dense, 8, 64, "float16") > full
    assert memory.kv_bytes_per_token(cfg, "float16") == 2 * 2 * 16 * 2
    with pytest.raises(ValueError):
        memory.budget_bytes(cfg, 1.5, 1, 1, "float16")
    with pytest.raises(ValueError):
        memory.dtype_bytes("int3")
