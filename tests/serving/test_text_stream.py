"""Stop strings never reach the client, streamed or not (rap.serving.text_stream)."""

from __future__ import annotations

from rap.serving.text_stream import TextStream

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
