"""Calibration text (for scoring blocks) and perplexity text (for evaluating masks), offline.

Both come from the PyPI package `exllamav2==0.3.2` (installed `--no-deps` and never imported: only
its data folder `conversion/standard_cal_data/` is read). They never overlap:

    calibration  = c4.utf8     (C4 web text, one document per line: 118 documents, ~78K tokens)
    perplexity   = wiki.utf8   (Wikipedia, `<doc ...>...</doc>` blocks: 2,349 docs, ~456K tokens)
    tiny.utf8    = TinyStories (`<|endoftext|>`-separated)
    code.utf8, technical.utf8, multilingual.utf8: sections separated by two or more blank lines

tiny, code, technical and multilingual are read by nothing but the held-out evaluation
protocol (`rap.importance.heldout`).

Documents are joined with a blank line and tokenized once; n = tokens // seq_len chunks of
`seq_len` tokens are taken evenly spaced over the whole token stream (chunk i starts at
i · stride, stride = ⌊len(stream) / n⌋ ≥ seq_len), so that a few thousand tokens still come from
many documents instead of the first one or two. `half="a"` / `"b"` takes the
first / second half of the distinct documents, so two halves never share a document (used to
measure how stable an importance order is). The zero-shot task sets are never used here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rap.core.errors import RapError
from rap.core.scores import TextInfo

if TYPE_CHECKING:
    import torch

CALIBRATION_SOURCE = "c4"
PERPLEXITY_SOURCE = "wiki"
SOURCES = {
    "c4": "c4.utf8",
    "wiki": "wiki.utf8",
    "tiny": "tiny.utf8",
    "code": "code.utf8",
    "technical": "technical.utf8",
    "multilingual": "multilingual.utf8",
}
Half = Literal["a", "b"] | None
_PACKAGE = "exllamav2"


def data_dir() -> Path:
    """The folder of exllamav2's standard calibration files (the package is never imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise RapError(
            "calibration text needs the package exllamav2, which is not installed",
            fix="pip install --no-deps exllamav2==0.3.2",
        )
    return Path(spec.origin).parent / "conversion" / "standard_cal_data"


def _split(source: str, text: str) -> list[str]:
    """Documents of one file: c4 one per line, wiki `<doc>` blocks, tiny `<|endoftext|>`, the
    others sections between runs of blank lines (the only boundary those files mark)."""
    if source == "wiki":
        docs = re.findall(r"<doc[^>]*>\n(.*?)</doc>", text, flags=re.S)
    elif source == "tiny":
        docs = text.split("<|endoftext|>")
    elif source == "c4":
        docs = text.split("\n")
    else:
        docs = re.split(r"\n{3,}", text)
    return [d.strip() for d in docs if d.strip()]


@functools.lru_cache(maxsize=8)
def documents(source: str, half: Half = None) -> tuple[str, ...]:
    """The documents of `source`, or the first (`a`) or second (`b`) half of them."""
    if source not in SOURCES:
        raise RapError(f"unknown text source {source!r}", expected=f"one of {sorted(SOURCES)}")
    path = data_dir() / SOURCES[source]
    if not path.is_file():
        raise RapError(f"{path} is missing", fix="pip install --no-deps exllamav2==0.3.2")
    docs = _split(source, path.read_text(encoding="utf-8"))
    if half is None:
        return tuple(docs)
    # c4.utf8 repeats 5 of its 118 documents: halves split the distinct ones, so that no
    # document is in both.
    distinct = list(dict.fromkeys(docs))
    mid = len(distinct) // 2
    return tuple(distinct[:mid] if half == "a" else distinct[mid:])


def text_of(source: str, half: Half = None) -> str:
    """The documents joined by a blank line: the exact string that is tokenized."""
    return "\n\n".join(documents(source, half))


def encode(tokenizer: Any, text: str, vocab_size: int) -> list[int]:
    """Token ids of `text`. Without a tokenizer (tests' tiny random models), UTF-8 bytes modulo
    the vocabulary stand in: deterministic, and enough to exercise the code paths."""
    if tokenizer is None:
        return [b % vocab_size for b in text.encode("utf-8")]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def usable_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """`tokenizer` if it encodes text into ids the model has, else None (bytes stand in): tiny
    random test models come with no tokenizer, or with one whose vocabulary is empty."""
    if tokenizer is None:
        return None
    probe = encode(tokenizer, "The quick brown fox.", vocab_size)
    return tokenizer if len(set(probe)) >= 3 and max(probe) < vocab_size else None


@functools.lru_cache(maxsize=8)
def _stream(tokenizer: Any, source: str, half: Half, vocab_size: int) -> tuple[int, ...]:
    return tuple(encode(tokenizer, text_of(source, half), vocab_size))


def chunks(
    tokenizer: Any,
    source: str,
    seq_len: int,
    tokens: int,
    vocab_size: int,
    half: Half = None,
) -> tuple[torch.Tensor, TextInfo]:
    """`tokens // seq_len` chunks of `seq_len` token ids, evenly spaced over `source`: [n, seq_len].

    Raises `RapError` when the text holds fewer tokens than asked, naming how many it has.
    """
    if seq_len < 2 or tokens < seq_len:
        raise RapError(
            f"{tokens} tokens in chunks of {seq_len} make no chunk",
            expected="seq_len ≥ 2 and tokens ≥ seq_len",
        )
    import torch  # lazy: heavy (torch)

    stream = _stream(usable_tokenizer(tokenizer, vocab_size), source, half, vocab_size)
    n = tokens // seq_len
    if n * seq_len > len(stream):
        raise RapError(
            f"{source}{'/' + half if half else ''} holds {len(stream):,} tokens, "
            f"fewer than the {n * seq_len:,} asked",
            expected=f"at most {len(stream) // seq_len * seq_len:,} tokens",
            fix="ask for fewer tokens or use another source",
        )
    stride = len(stream) // n
    starts = [i * stride for i in range(n)]
    ids = torch.tensor([stream[s : s + seq_len] for s in starts], dtype=torch.long)
    digest = hashlib.sha256(text_of(source, half).encode("utf-8")).hexdigest()
    info = TextInfo(
        source=source,
        half=half,
        text_sha256=digest,
        seq_len=seq_len,
        chunks=n,
        tokens=n * seq_len,
        stride=stride,
    )
    return ids, info


def calibration_chunks(
    tokenizer: Any, seq_len: int, tokens: int, vocab_size: int, half: Half = None
) -> tuple[torch.Tensor, TextInfo]:
    """Chunks of the calibration text (c4): what block scores are computed on."""
    return chunks(tokenizer, CALIBRATION_SOURCE, seq_len, tokens, vocab_size, half)


def perplexity_chunks(
    tokenizer: Any, seq_len: int, tokens: int, vocab_size: int
) -> tuple[torch.Tensor, TextInfo]:
    """Chunks of the perplexity text (wiki): what masks are evaluated on."""
    return chunks(tokenizer, PERPLEXITY_SOURCE, seq_len, tokens, vocab_size)
