"""The evaluation protocol: per text domain, validation and test windows that no block score,
surrogate fit or earlier choice read.

    domain        role        file (exllamav2's data folder, `rap.importance.calibration`)
    wiki          in-domain   wiki.utf8: the surrogate's fit and validation text
    c4            in-domain   c4.utf8: the calibration text of the stored block scores
    code          held-out    code.utf8
    technical     held-out    technical.utf8
    tiny          held-out    tiny.utf8 (TinyStories)
    multilingual  separate    multilingual.utf8: reported apart, never in a mean over domains

**Text.** A domain's documents (`calibration.documents`; code, technical and multilingual
mark documents only by runs of blank lines, so they have 103, 5 and 3) minus every document
something read: any chunk of the block scores the planners read (`find_scores`, shipped or
cached) calibrated on that file, the chunks tools read by default and were judged on
(`DEFAULT_READS`), wiki's documents that begin in the surrogate's fit / validation / served
prefix (`doc_text.PREFIX_CHARS`), and the old test split's documents (`doc_text.chosen_docs`,
on which the served default was chosen); a repeated copy of a read document is read too. The
rest, in file order, each tokenized alone and joined by the separator's tokens, is the domain's
stream.

**Spans.** The stream is cut into 2 · BLOCKS_PER_SPLIT equal blocks (fewer where fewer, longer
blocks hold more 2,048-token windows): even blocks are the validation split, odd ones the test
split, so both spread over the whole file and never share a token. The blocks do not depend on
the window length.

**Windows** of L tokens (`WINDOWS`; L is the planned sequence length of a shape, `SHAPES`):
[BOS] + L − 1 stream tokens, so every text token is predicted and NLL sums L − 1 terms. The
window slots tile each block from its start (none crosses a block's end); a split takes
WINDOWS_PER_SPLIT of its slots evenly spaced over all of them, or every slot when it has fewer
(a short domain at 2,048). Fewer than WINDOWS_PER_SPLIT windows or MIN_DOCUMENTS documents
is recorded with the results (`Windows.shortfall`), never silently accepted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rap.core.errors import RapError
from rap.core.scores import METHODS, ScoresError, find_scores
from rap.importance.calibration import documents, encode, usable_tokenizer
from rap.importance.doc_text import DOMAINS as TEST_SPLIT_DOMAINS

if TYPE_CHECKING:
    import torch

    from rap.core.model import PrunableModel
from rap.importance.doc_text import (
    PREFIX_CHARS,
    SEPARATOR,
    chosen_docs,
    doc_starts,
    token_chars,
    touched_docs,
    unread,
)

Role = Literal["in-domain", "held-out", "separate"]
Split = Literal["validation", "test"]
DOMAINS: dict[str, Role] = {
    "wiki": "in-domain",
    "c4": "in-domain",
    "code": "held-out",
    "technical": "held-out",
    "tiny": "held-out",
    "multilingual": "separate",
}
SPLITS: tuple[Split, ...] = ("validation", "test")
WINDOWS = (256, 512, 1024, 2048)
SHAPES = {"1x512": (1, 512), "8x2048": (8, 2048), "8x256": (8, 256)}
"""Shape name → (batch, sequence length) a plan is made for; windows are that long."""
BLOCKS_PER_SPLIT = 8
WINDOWS_PER_SPLIT = 16
MIN_DOCUMENTS = 8
"""What a split's windows should touch; fewer is recorded (`Windows.shortfall`)."""


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise RapError(f"unknown domain {domain!r}", expected=f"some of {', '.join(DOMAINS)}")


DEFAULT_READS: dict[str, tuple[tuple[int, int], ...]] = {
    "wiki": ((1024, 8192),),
    "c4": ((256, 1024), (256, 256)),
}
"""(seq_len, tokens) of the evenly spread chunks (`calibration.chunks`) that tools read by
default and whose results were judged: `rap eval`'s perplexity text (wiki); `rap plan --method
oracle`'s calibration and the policy comparison's timing chunk (c4)."""


def _spread(n_tokens: int, seq_len: int, tokens: int) -> dict[str, int]:
    """The layout `calibration.chunks` gives `tokens` in chunks of `seq_len` over a stream."""
    n = tokens // seq_len
    return {"seq_len": seq_len, "chunks": n, "stride": n_tokens // n}


def _score_reads(model_id: str, domain: str) -> tuple[list[dict], bool]:
    """Chunk layouts of the block scores planners read (`find_scores`) calibrated on `domain`,
    and whether any was computed on a half of it (its chunks lie on the half's own stream, so
    `read_docs` then counts every document of the file as read, rather than guess)."""
    specs, halves = [], False
    for method in METHODS:
        try:
            cal = find_scores(model_id, method).calibration
        except ScoresError:
            continue
        if cal is not None and cal.source == domain:
            halves |= cal.half is not None
            specs.append({"seq_len": cal.seq_len, "chunks": cal.chunks, "stride": cal.stride})
    return specs, halves


def read_docs(domain: str, tok: Any, vocab: int, model_id: str) -> set[int]:
    """Indices of the documents of `domain` that something read (module doc)."""
    docs = documents(domain)
    starts = doc_starts(docs)
    specs, halves = _score_reads(model_id, domain)
    if halves:
        return set(range(len(docs)))
    read: set[int] = set()
    spans = token_chars(tok, SEPARATOR.join(docs), vocab)
    specs += [_spread(len(spans), s, t) for s, t in DEFAULT_READS.get(domain, ())]
    if specs:
        read |= touched_docs(spans, starts, specs)
    if domain == "wiki":
        read |= {i for i, s in enumerate(starts) if s < PREFIX_CHARS}
    if domain in TEST_SPLIT_DOMAINS:
        read |= {i for i, _ in chosen_docs(domain, tok, vocab, model_id)}
    return read


def unread_docs(domain: str, tok: Any, vocab: int, model_id: str) -> list[int]:
    """Indices of the documents the protocol may use: unread, and no copy of a read one."""
    docs = documents(domain)
    return unread(docs, read_docs(domain, tok, vocab, model_id))


@dataclass(frozen=True)
class Stream:
    """A domain's protocol text as token ids, with the document of every token (−1: separator)."""

    ids: tuple[int, ...]
    owner: tuple[int, ...]


def domain_stream(domain: str, tok: Any, vocab: int, model_id: str) -> Stream:
    """The domain's protocol text (module doc). Not cached here: which documents are read
    depends on the block scores in the cache folder, which may change between calls."""
    check_domain(domain)
    docs = documents(domain)
    sep = encode(tok, SEPARATOR, vocab)
    ids: list[int] = []
    owner: list[int] = []
    for n, i in enumerate(unread_docs(domain, tok, vocab, model_id)):
        if n:
            ids += sep
            owner += [-1] * len(sep)
        part = encode(tok, docs[i], vocab)
        ids += part
        owner += [i] * len(part)
    return Stream(tuple(ids), tuple(owner))


def split_blocks(n_tokens: int, split: Split) -> list[tuple[int, int]]:
    """[start, end) token ranges of the blocks of `split` (module doc): BLOCKS_PER_SPLIT, or
    fewer where that gives more windows of the longest length (the most blocks among ties)."""

    def longest(blocks: int) -> int:
        per_block = n_tokens // (2 * blocks) // (max(WINDOWS) - 1)
        return min(WINDOWS_PER_SPLIT, blocks * per_block)

    per_split = max(range(1, BLOCKS_PER_SPLIT + 1), key=lambda b: (longest(b), b))
    count = 2 * per_split
    size = n_tokens // count
    first = SPLITS.index(split)
    return [(b * size, (b + 1) * size) for b in range(first, count, 2)]


def window_starts(blocks: list[tuple[int, int]], window: int) -> list[int]:
    """Stream offsets of the text of a split's windows (module doc)."""
    text = window - 1
    slots = [s + j * text for s, e in blocks for j in range((e - s) // text)]
    n = min(WINDOWS_PER_SPLIT, len(slots))
    return [slots[i * len(slots) // n] for i in range(n)]


@dataclass(frozen=True)
class Windows:
    """The windows of one domain, split and length: ids [n, window] and what they cover."""

    domain: str
    split: Split
    window: int
    ids: torch.Tensor
    """Token ids [n, window] (long); column 0 is BOS."""
    starts: tuple[int, ...]
    """Stream offset of each window's first text token."""
    digests: tuple[str, ...]
    """Each window's identity: a digest of its ids (what the NLL cache is keyed by)."""
    documents: int
    """Distinct documents the windows' text touches."""
    stream_tokens: int

    @property
    def predicted(self) -> int:
        """Predicted tokens per window."""
        return self.window - 1

    def shortfall(self) -> str | None:
        """Why this set has fewer windows or documents than the protocol asks, else None."""
        short = []
        if len(self.starts) < WINDOWS_PER_SPLIT:
            short.append(f"{_count(len(self.starts), 'window')} (asked {WINDOWS_PER_SPLIT})")
        if self.documents < MIN_DOCUMENTS:
            short.append(f"{_count(self.documents, 'document')} (asked {MIN_DOCUMENTS})")
        if not short:
            return None
        return (
            f"{self.domain} {self.split} at {self.window}: "
            + " and ".join(short)
            + f"; the domain's unread text is {self.stream_tokens:,} tokens"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def bos_id(model: PrunableModel) -> int:
    """The token every window starts with: the model's BOS (config, else tokenizer)."""
    for source in (getattr(model.hf, "config", None), model.tokenizer):
        value = getattr(source, "bos_token_id", None)
        if isinstance(value, int):
            return value
    raise RapError(
        f"model {model.model_id} names no BOS token",
        expected="bos_token_id in its config or tokenizer",
    )


def window_digest(ids: list[int]) -> str:
    return hashlib.sha256(repr(ids).encode()).hexdigest()[:16]


def model_stream(model: PrunableModel, domain: str) -> Stream:
    vocab = model.dims.vocab
    tok = usable_tokenizer(model.tokenizer, vocab)
    return domain_stream(domain, tok, vocab, model.model_id)


def windows(
    model: PrunableModel,
    domain: str,
    split: Split,
    window: int,
    stream: Stream | None = None,
    limit: int | None = None,
) -> Windows:
    """The protocol's windows of `domain` for `split` at length `window` (module doc);
    `stream`: the domain's `model_stream`, when the caller already has it; `limit`: only the
    first that many (a quick run)."""
    import torch  # lazy: heavy (torch)

    if split not in SPLITS:
        raise RapError(f"unknown split {split!r}", expected=" or ".join(SPLITS))
    if window < 2:
        raise RapError(f"a window of {window} tokens predicts nothing", expected="at least 2")
    stream = stream or model_stream(model, domain)
    starts = window_starts(split_blocks(len(stream.ids), split), window)[:limit]
    if not starts:
        raise RapError(
            f"the {domain} text ({len(stream.ids):,} tokens) has no {split} window of {window}",
            expected="a shorter window",
        )
    bos = bos_id(model)
    rows = [[bos, *stream.ids[s : s + window - 1]] for s in starts]
    owners = {o for s in starts for o in stream.owner[s : s + window - 1]} - {-1}
    return Windows(
        domain,
        split,
        window,
        torch.tensor(rows, dtype=torch.long),
        tuple(starts),
        tuple(window_digest(r) for r in rows),
        len(owners),
        len(stream.ids),
    )
