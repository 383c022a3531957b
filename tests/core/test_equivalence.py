"""Invariant 4: a masked model computes what the model with those blocks deleted computes."""

from __future__ import annotations

import pytest
import torch

import rap
from rap.core.errors import UnsupportedModelError
from rap.core.masks import KeepMask
from tests.reference import reference_logits
from tests.tiny import ARCHS, WINDOW


def _masks(model_id: str, n: int) -> dict[str, KeepMask]:
    last = str(n - 1)
    return {
        "dense": KeepMask.dense(model_id, n),
        "layer0-attn": KeepMask.from_drops(model_id, n, drop_attn="0"),
        "last-mlp": KeepMask.from_drops(model_id, n, drop_mlp=last),
        "mixed": KeepMask.from_drops(model_id, n, drop_attn=f"0,{n - 2}", drop_mlp=f"1,{last}"),
        "whole-layer": KeepMask.from_drops(model_id, n, drop_attn="1", drop_mlp="1"),
        "no-attention": KeepMask.from_drops(model_id, n, drop_attn=f"0-{last}"),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_logits_equal_reference(arch: str, tiny_dirs) -> None:
    model = rap.load_model(str(tiny_dirs[arch]), device="cpu")
    reference = rap.load_model(str(tiny_dirs[arch]), device="cpu").hf  # never masked
    ids = torch.randint(3, 96, (1, 3 * WINDOW))  # longer than every sliding window
    for name, mask in _masks(model.model_id, model.num_layers).items():
        model.apply(mask)
        with torch.inference_mode():
            got = model.hf(input_ids=ids, use_cache=False).logits
        want = reference_logits(reference, ids, mask.attn, mask.mlp)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{arch} {name}")
    model.restore()
    with torch.inference_mode():
        dense = model.hf(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(dense, reference_logits(reference, ids, [True] * 99, [True] * 99))


def test_masks_change_the_output(tiny_dirs) -> None:
    """The reference is not vacuous: dropping a block changes the logits."""
    model = rap.load_model(str(tiny_dirs["llama"]), device="cpu")
    ids = torch.randint(3, 96, (1, 8))
    dense = model.hf(input_ids=ids).logits
    model.apply(KeepMask.from_drops(model.model_id, model.num_layers, drop_mlp="2"))
    assert (model.hf(input_ids=ids).logits - dense).abs().max() > 1e-3


def test_unsupported_architecture_is_named(tmp_path) -> None:
    import transformers as tf

    config = tf.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        is_decoder=True,
    )
    tf.BertLMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"llama.*gpt2"):
        rap.load_model(str(tmp_path), device="cpu")
