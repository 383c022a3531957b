"""Random-weight presets (`random:toy`, `random:llama-7b`): built from a config with no weight
file, served through the same loading, masks and tokenizer paths as a real model."""

from __future__ import annotations

import pytest
import torch

from rap.core import memory
from rap.core.errors import ModelNotFoundError
from rap.core.loading import load_config, load_model
from rap.core.masks import KeepMask
from rap.core.random_models import PRESETS, ByteTokenizer
from rap.core.weights import weights_digest
from rap.serving.sizing import engine_peak_bytes


def test_toy_loads_without_files_and_restores_bit_identically() -> None:
    model = load_model("random:toy", dtype="float32", device="cpu")
    assert model.model_id == "random:toy"
    assert model.store.source is None  # no file: dropped blocks wait in host memory
    assert model.weight_bytes() == memory.weight_bytes(model.config, model.mask, model.dtype)
    before = weights_digest(model.hf)
    mask = KeepMask.from_drops("random:toy", model.num_layers, drop_attn="1", drop_mlp="2")
    change = model.apply(mask)
    assert change.released_bytes > 0
    assert model.weight_bytes() == memory.weight_bytes(model.config, mask, model.dtype)
    model.apply(model.dense_mask().model_copy(update={"version": mask.version}))
    assert weights_digest(model.hf) == before


def test_toy_is_seeded_and_in_the_asked_dtype() -> None:
    a = load_model("random:toy", dtype="bfloat16", device="cpu")
    b = load_model("random:toy", dtype="bfloat16", device="cpu")
    assert a.dtype == torch.bfloat16
    assert weights_digest(a.hf) == weights_digest(b.hf)
    assert torch.get_default_dtype() == torch.float32  # put back after the build


def test_toy_generates_from_chat_text() -> None:
    model = load_model("random:toy", dtype="float32", device="cpu")
    ids = model.encode([{"role": "user", "content": "héllo"}])
    assert max(ids) < model.config.vocab_size
    out = model.generate(["hi"], max_new_tokens=4)
    assert len(out.token_ids[0]) >= 1 and isinstance(out.texts[0], str)


def test_config_without_weights_is_llama_7b_shaped() -> None:
    config, model_id = load_config("random:llama-7b")
    assert model_id == "random:llama-7b"
    assert config.num_hidden_layers == 32 and config.hidden_size == 4096
    params = memory.weight_bytes(config, KeepMask.dense(model_id, 32), torch.float16) / 2
    assert 6.7e9 < params < 6.8e9  # Llama-2-7B's 6.74 B


def test_unknown_preset_says_what_is_known() -> None:
    with pytest.raises(ModelNotFoundError) as err:
        load_model("random:llama-70b", device="cpu")
    assert "random:llama-70b" in str(err.value)
    assert all(f"random:{k}" in str(err.value) for k in PRESETS)


def test_byte_tokenizer_round_trips_text_and_bounds_token_length() -> None:
    tok = ByteTokenizer()
    ids = tok("naïve ☃")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == "naïve ☃"
    assert tok.decode([2, 70_000]) == bytes([(70_000 - 3) % 256]).decode("utf-8", "replace")
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert text.endswith("<|assistant|>\n")
    assert max(len(t) for t in tok.get_vocab()) == len("<pad>")


def test_an_engine_serves_the_toy_from_chat_text_and_reports_its_bytes() -> None:
    """The replica's path (Intake → Engine → telemetry) on a random model: chat text in, tokens
    out, and the snapshot's prediction is the sizing's for the mask and pool it holds."""
    import asyncio
    import os

    from rap.serving.engine import Engine
    from rap.serving.intake import Intake
    from rap.serving.messages import DeviceMemory
    from rap.serving.telemetry import snapshot
    from tests.serving.test_engine import CONFIG, roomy

    model = load_model("random:toy", device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    intake = Intake(model, engine, model.model_id)
    call = {
        "model": "random:toy",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "ignore_eos": True,
    }

    async def go() -> list[dict]:
        request = await intake.request(call)
        return [e async for e in engine.submit(request)]  # ignore_eos: all 5 tokens

    events = asyncio.run(go())
    assert sum(e["type"] == "token" for e in events) == 5
    tel = snapshot(
        "r", engine, DeviceMemory(kind="cpu", total_bytes=1, used_bytes=0, free_bytes=1), 0.0
    )
    assert tel.predicted_bytes == engine.sizing.bytes_with(
        model.mask, engine.scheduler.pool.capacity
    )
    assert tel.process is not None and tel.process.pid == os.getpid()
    assert tel.process.allocated_bytes is None  # a CPU: no allocator figures
    e = engine.config  # what GPU shares cap the replica at: dense, full rows, one step
    context = model.config.max_position_embeddings
    full = engine_peak_bytes(model, e, model.dense_mask(), e.max_batch_size, context)
    assert tel.want_bytes == full > tel.predicted_bytes > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_toy_is_built_there_restores_from_pinned_host_and_reports_its_allocator() -> (
    None
):
    from rap.serving.engine import Engine
    from rap.serving.messages import DeviceMemory
    from rap.serving.telemetry import snapshot
    from tests.serving.test_engine import CONFIG, roomy

    model = load_model("random:toy", dtype="float16", device="cuda")
    assert next(model.hf.parameters()).is_cuda
    before = weights_digest(model.hf)
    mask = KeepMask.from_drops("random:toy", model.num_layers, drop_attn="1", drop_mlp="2")
    model.apply(mask)
    assert all(s.host is None or s.host.is_pinned() for s in model.store.slots.values())
    model.apply(model.dense_mask().model_copy(update={"version": mask.version}))
    assert weights_digest(model.hf) == before
    engine = Engine(model, CONFIG, roomy(model), None)
    tel = snapshot(
        "r", engine, DeviceMemory(kind="cuda", total_bytes=1, used_bytes=0, free_bytes=1), 0.0
    )
    assert tel.process is not None and tel.process.allocated_bytes is not None
    assert tel.process.allocated_bytes >= model.weight_bytes()
    assert tel.process.peak_allocated_bytes >= tel.process.allocated_bytes
