"""The held-out protocol (`rap.importance.heldout`): text nothing else read, disjoint splits,
BOS windows; paired intervals; the per-window NLL cache and its resume."""

from __future__ import annotations

import numpy as np
import pytest

from rap.core.loading import DEFAULT_MODEL_ID, load_model
from rap.core.scores import find_scores
from rap.importance import doc_text, heldout
from rap.importance.calibration import documents
from rap.importance.paired import paired_interval
from rap.importance.window_nll import WindowMeter, read_rows

BYTES = 256  # byte tokens stand in for the tokenizer: the rules are the same for any


def _owners(docs: tuple[str, ...]) -> list[int]:
    """The document of every byte of the joined text (−1: separator), found independently."""
    owner: list[int] = []
    for i, d in enumerate(docs):
        owner += [i] * len(d.encode("utf-8"))
        if i < len(docs) - 1:
            owner += [-1] * len(doc_text.SEPARATOR)
    return owner


def _read_by_chunks(owner: list[int], seq_len: int, chunks: int, stride: int) -> set[int]:
    return {o for c in range(chunks) for o in owner[c * stride : c * stride + seq_len]} - {-1}


def test_c4_text_is_none_the_scores_tools_or_old_test_split_read() -> None:
    docs = documents("c4")
    owner = _owners(docs)
    read: set[int] = set()
    for method in ("gsi", "oneshot", "bi"):
        cal = find_scores(DEFAULT_MODEL_ID, method).calibration
        assert cal is not None and cal.source == "c4"
        read |= _read_by_chunks(owner, cal.seq_len, cal.chunks, cal.stride)
    for seq_len, tokens in heldout.DEFAULT_READS["c4"]:
        n = tokens // seq_len
        read |= _read_by_chunks(owner, seq_len, n, len(owner) // n)
    read |= {i for i, _ in doc_text.chosen_docs("c4", None, BYTES, DEFAULT_MODEL_ID)}
    used = heldout.unread_docs("c4", None, BYTES, DEFAULT_MODEL_ID)
    assert used and not set(used) & read
    assert not {docs[i] for i in used} & {docs[i] for i in read}  # nor a repeated copy
    assert len({docs[i] for i in used}) == len(used)


def test_wiki_text_begins_after_the_surrogate_text_and_misses_rap_evals_chunks() -> None:
    docs = documents("wiki")
    starts = doc_text.doc_starts(docs)
    used = set(heldout.unread_docs("wiki", None, BYTES, DEFAULT_MODEL_ID))
    # quality.part_ids (the surrogate's fit, validation and served text) reads only the prefix.
    assert min(starts[i] for i in used) >= doc_text.PREFIX_CHARS
    owner = _owners(docs)
    assert not used & _read_by_chunks(owner, 1024, 8, len(owner) // 8)  # rap eval's default
    assert not used & {i for i, _ in doc_text.chosen_docs("wiki", None, BYTES, DEFAULT_MODEL_ID)}


@pytest.mark.parametrize("n_tokens", [20_000, 61_515, 410_078])
def test_validation_and_test_windows_never_share_a_token(n_tokens: int) -> None:
    spans = {s: heldout.split_blocks(n_tokens, s) for s in heldout.SPLITS}
    for window in heldout.WINDOWS:
        taken = {}
        for split, blocks in spans.items():
            cover: set[int] = set()
            starts = heldout.window_starts(blocks, window)
            for start in starts:
                block = next(b for b in blocks if b[0] <= start < b[1])
                assert start + window - 1 <= block[1]  # no window crosses its block's end
                cover |= set(range(start, start + window - 1))
            assert len(cover) == len(starts) * (window - 1)  # no token predicted twice
            taken[split] = cover
            assert len(heldout.window_starts(blocks, window)) <= heldout.WINDOWS_PER_SPLIT
        assert taken["validation"] and not taken["validation"] & taken["test"]
    big = heldout.window_starts(heldout.split_blocks(410_078, "test"), 2048)
    assert len(big) == heldout.WINDOWS_PER_SPLIT


def test_windows_start_with_bos_and_hold_the_next_stream_tokens(tiny_dirs) -> None:
    model = load_model(str(tiny_dirs["llama"]))
    stream = heldout.model_stream(model, "code")
    w = heldout.windows(model, "code", "validation", 64, stream)
    assert tuple(w.ids.shape) == (heldout.WINDOWS_PER_SPLIT, 64)
    assert (w.ids[:, 0] == heldout.bos_id(model)).all() and heldout.bos_id(model) == 1
    for row, start in zip(w.ids.tolist(), w.starts, strict=True):
        assert row[1:] == list(stream.ids[start : start + 63])
    assert len(set(w.digests)) == len(w.digests) and w.shortfall() is None
    few = heldout.windows(model, "multilingual", "test", 64, limit=3)
    assert few.shortfall() is not None and "3 windows" in few.shortfall()


def test_paired_interval_of_a_constant_shift_is_exact_and_pairing_cancels_shared_noise():
    rng = np.random.default_rng(1)
    b = list(rng.gamma(2.0, 500.0, 16))  # windows differ a lot from one another
    a = [x + 7.0 for x in b]
    shift = paired_interval({"d": a}, {"d": b}, window=8)
    assert shift.diff == pytest.approx(1.0) and shift.low == pytest.approx(1.0)
    assert shift.high == pytest.approx(1.0)
    noisy = [x + 7.0 + rng.normal(0, 7.0) for x in b]
    got = paired_interval({"d": noisy}, {"d": b}, window=8)
    assert got.low < got.diff < got.high and got.high - got.low < 2.0
    two = paired_interval({"d": a, "e": b}, {"d": b, "e": b}, window=8)  # domains weigh alike
    assert two.diff == pytest.approx(0.5)


def test_cached_windows_are_not_measured_again_and_a_killed_run_resumes(tiny_dirs, tmp_path):
    model = load_model(str(tiny_dirs["llama"]))
    w = heldout.windows(model, "tiny", "validation", 32, limit=6)
    full = WindowMeter(model, tmp_path / "full.jsonl", batch_size=2)
    want = full.nll("a1,m2", w)
    assert full.computed == 6 and len(want) == 6

    class Killed(Exception):
        pass

    def kill_after_first_batch(_n: int) -> None:
        raise Killed

    path = tmp_path / "killed.jsonl"
    with pytest.raises(Killed):
        WindowMeter(model, path, batch_size=2).nll("a1,m2", w, kill_after_first_batch)
    assert len(read_rows(path)) == 2  # the first batch was written before the kill
    with path.open("a") as f:
        f.write('{"model": "cut sh')  # a line the kill cut short
    resumed = WindowMeter(model, path, batch_size=2)
    assert resumed.nll("a1,m2", w) == pytest.approx(want, rel=1e-5)
    assert resumed.computed == 4
    again = WindowMeter(model, path, batch_size=2)
    assert again.nll("a1,m2", w) == resumed.nll("a1,m2", w) and again.computed == 0
