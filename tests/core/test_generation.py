"""Mask-aware generation: positions, left padding, one mask per generation."""

from __future__ import annotations

import threading

import pytest

import rap
from rap.core.errors import MaskBusyError, MaskError
from rap.core.masks import KeepMask, MaskVersion
from tests.tiny import ARCHS

PROMPTS = [[5, 9, 14], [7, 8, 9, 10, 11, 12, 13, 20, 21], [30], [40, 41, 42, 43, 44, 45]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drop_attn", ["0", "0,1"])
def test_left_padded_batch_equals_unbatched(arch: str, drop_attn: str, tiny_dirs) -> None:
    """With layer 0's attention dropped, a left-padded batch decodes as each prompt alone."""
    model = rap.load_model(str(tiny_dirs[arch]), device="cpu")
    model.apply(KeepMask.from_drops(model.model_id, model.num_layers, drop_attn=drop_attn))
    batched = model.generate_ids(PROMPTS, 12, stop_at_eos=False).token_ids
    alone = [model.generate_ids([p], 12, stop_at_eos=False).token_ids[0] for p in PROMPTS]
    assert batched == alone
    assert len({tuple(r) for r in alone}) > 1  # not a degenerate constant output


def test_positions_survive_a_dropped_first_layer(tiny_dirs) -> None:
    """Greedy decoding through the cache equals re-running the whole sequence each step."""
    import torch

    model = rap.load_model(str(tiny_dirs["llama"]), device="cpu")
    model.apply(KeepMask.from_drops(model.model_id, model.num_layers, drop_attn="0"))
    out = model.generate_ids([PROMPTS[1]], 10, stop_at_eos=False).token_ids[0]
    seq = list(PROMPTS[1])
    with torch.inference_mode():
        for _ in range(10):
            logits = model.hf(input_ids=torch.tensor([seq]), use_cache=False).logits
            seq.append(int(logits[0, -1].argmax()))
    assert out == seq[len(PROMPTS[1]) :]


def test_generation_without_any_attention(tiny_dirs) -> None:
    model = rap.load_model(str(tiny_dirs["gpt2"]), device="cpu")
    model.apply(KeepMask.from_drops(model.model_id, model.num_layers, drop_attn="0-3"))
    out = model.generate_ids(PROMPTS[:2], 5, stop_at_eos=False)
    assert out.kv_bytes == 0 and all(len(r) == 5 for r in out.token_ids)


def test_a_mask_holds_for_the_whole_generation(tiny_dirs) -> None:
    """A mask applied mid-generation waits for the batch to end and governs the next one."""
    model = rap.load_model(str(tiny_dirs["llama"]), device="cpu")
    n = model.num_layers
    first = KeepMask.from_drops(model.model_id, n, drop_mlp="1")
    second = KeepMask.from_drops(model.model_id, n, drop_attn="2", drop_mlp="0")
    model.apply(first)
    expected_first = model.generate_ids([PROMPTS[1]], 30, stop_at_eos=False).token_ids
    model.apply(second)
    expected_second = model.generate_ids([PROMPTS[1]], 30, stop_at_eos=False).token_ids
    assert expected_first != expected_second
    model.apply(first)

    started, applied = threading.Event(), threading.Event()

    class Streamer:
        calls = 0

        def put(self, _value) -> None:
            Streamer.calls += 1
            if Streamer.calls == 2:
                started.set()
                assert not applied.wait(0.3)  # apply() must still be waiting

        def end(self) -> None:
            pass

    def change_mask() -> None:
        started.wait()
        model.apply(second)
        applied.set()

    t = threading.Thread(target=change_mask)
    t.start()
    during = model.generate_ids([PROMPTS[1]], 30, streamer=Streamer(), stop_at_eos=False)
    t.join(10)
    assert applied.is_set()
    assert during.mask == first and during.token_ids == expected_first
    assert model.mask == second
    assert model.generate_ids([PROMPTS[1]], 30, stop_at_eos=False).token_ids == expected_second


def test_busy_and_stale_masks_are_refused(tiny_dirs) -> None:
    model = rap.load_model(str(tiny_dirs["llama"]), device="cpu")
    n = model.num_layers
    newer = KeepMask.dense(model.model_id, n).model_copy(update={"version": MaskVersion(epoch=1)})
    model.apply(newer)
    with pytest.raises(MaskError, match="older"):
        model.apply(KeepMask.dense(model.model_id, n))
    with pytest.raises(MaskError, match="for model"):
        model.apply(KeepMask.dense("other", n))
    with pytest.raises(MaskError, match="layers"):
        model.apply(KeepMask.dense(model.model_id, n + 1))
    model._lock.acquire()
    try:
        with pytest.raises(MaskBusyError):
            model.apply(newer, timeout_s=0.05)
    finally:
        model._lock.release()
