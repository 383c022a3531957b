"""Stop strings never reach the client, streamed or not (rap.serving.text_stream)."""

from __future__ import annotations

import random
from collections.abc import Callable

from rap.serving.request_text import MAX_STOP_CHARS
from rap.serving.text_stream import WINDOW_IDS, TextStream

PIECES = {1: "Hello", 2: " wor", 3: "ld", 4: " ST", 5: "OP", 6: " more", 7: "\ufffd"}


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def stream(ids: list[int], stop: list[str]) -> tuple[list[str], TextStream]:
    s = TextStream(decode, stop)
    sent = []
    for t in ids:
        sent.append(s.push(t))
        if s.stopped:
            break
    sent.append(s.flush())
    return sent, s


def test_a_stop_string_split_across_tokens_is_cut_before_any_of_it_is_sent() -> None:
    sent, s = stream([1, 2, 3, 4, 5, 6], ["STOP"])
    assert s.stopped and "".join(sent) == "Hello world "
    assert "ST" not in "".join(sent)
    # " ST" was held back while it could still begin "STOP"
    assert sent[:4] == ["Hello", " wor", "ld", " "]


def test_held_text_is_released_when_it_stops_being_a_prefix() -> None:
    sent, s = stream([1, 4, 6], ["STOP"])
    assert not s.stopped and "".join(sent) == "Hello ST more"
    assert sent[1] == " " and sent[2] == "ST more"


def test_unfinished_characters_wait_and_no_stop_means_everything_is_sent() -> None:
    sent, _ = stream([1, 7], [])
    assert sent == ["Hello", "", "\ufffd"]
    sent, _ = stream([1, 2, 3], [])
    assert "".join(sent) == "Hello world"


def byte_decode(pieces: list[bytes]) -> Callable[[list[int]], str]:
    """A byte-level tokenizer's decode (pieces may split a character), with a first-token rule
    like SentencePiece's: the text's leading space is dropped."""

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", "replace").removeprefix(" ")

    return decode


def pushed(s: TextStream, ids: list[int]) -> str:
    out = []
    for t in ids:
        out.append(s.push(t))
        if s.stopped:
            break
    return "".join(out) + s.flush()


def test_incremental_text_is_the_whole_decode_with_split_characters_and_a_first_token_rule() -> (
    None
):
    """The window decodes only the last ids; what it sends must still be the text of them all."""
    text = "Grüße, 東京 😀 and plain words. " * 60
    raw = text.encode()
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(raw)), len(raw) // 3))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    decode = byte_decode(pieces)
    ids = list(range(len(pieces)))
    assert any(p.decode("utf-8", "replace").endswith("\ufffd") for p in pieces)  # split chars
    assert pushed(TextStream(decode, []), ids) == decode(ids)
    whole = decode(ids)
    stop = "words. Grü"
    assert pushed(TextStream(decode, [stop, "never there"]), ids) == whole[: whole.find(stop)]
    # "Gr" then an unfinished "ü": it was sent, as the check ran on text ending in "\ufffd"
    assert pieces[:2] == [b"G", b"r\xc3"]
    assert pushed(TextStream(decode, ["Grüße"]), ids) == ""


def test_work_per_token_does_not_grow_over_a_long_output() -> None:
    """Every token re-decoded every id and rescanned the text for every stop prefix, on the
    engine thread: a long output with long stop strings slowed every row of the replica."""
    pieces = [b"a", b"ab", b"b ", b" ", "é".encode()[:1], "é".encode()[1:]]
    stops = ["a" * 255 + "X", "ab" * 127 + "Y", "b " * 128, "é" * 200 + "Z"]
    assert all(len(s) <= MAX_STOP_CHARS for s in stops)
    decode = byte_decode(pieces)
    period = [0] * 300 + [2] + [1] * 150 + [4, 5] * 100 + [3]  # long runs of stop prefixes
    s = TextStream(decode, stops)
    ids_per_token, chars_per_token = [], []
    sent = []
    for k in range(4000):
        before = s.ids_decoded, s.chars_scanned
        sent.append(s.push(period[k % len(period)]))
        ids_per_token.append(s.ids_decoded - before[0])
        chars_per_token.append(s.chars_scanned - before[1])
    assert not s.stopped and "".join(sent) + s.flush() == decode(s.ids)
    assert max(chars_per_token) >= len(stops) * 255  # 255 characters held: work to do
    # bounded by the window and the stop strings' overlap, not by the 4,000 tokens
    assert max(ids_per_token) <= 3 * WINDOW_IDS
    longest_piece = max(len(p) for p in pieces)
    assert max(chars_per_token) <= 2 * len(stops) * (MAX_STOP_CHARS + longest_piece)
    assert max(ids_per_token[-1000:]) <= max(ids_per_token[:1000])
    assert max(chars_per_token[-1000:]) <= max(chars_per_token[:1000])
