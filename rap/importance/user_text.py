"""A user's own text for `rap eval --text FILE`: read, checked, cut into windows.

The file is read as UTF-8 and tokenized whole (no special tokens). Windows tile it from its
first token, without overlap: window i is

    [BOS] + tokens[i · (L − 1) : (i + 1) · (L − 1)]          (L = --ppl-seq-len)

so the stride is L − 1 tokens, every window predicts its L − 1 text tokens (the first from BOS
alone), and no token is predicted twice. The first ⌊--ppl-tokens / L⌋ windows are taken (at
least one); a tail shorter than L − 1 tokens is left out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from rap.core.errors import RapError
from rap.core.scores import TextInfo
from rap.importance.calibration import encode, usable_tokenizer
from rap.importance.heldout import bos_id

if TYPE_CHECKING:
    import torch

    from rap.core.model import PrunableModel


def read_text(path: str) -> tuple[str, str]:
    """The text of the file at `path` and the SHA-256 of its bytes; a `RapError` that says what
    is wrong with a missing, unreadable, non-UTF-8 or empty file."""
    file = Path(path)
    if not file.is_file():
        what = "a folder" if file.is_dir() else "missing"
        raise RapError(
            f"--text {path} is {what}",
            expected="a UTF-8 text file",
            fix="check the path",
        )
    try:
        data = file.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RapError(
            f"cannot read --text {path} ({reason})", fix="check its permissions"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RapError(
            f"--text {path} is not UTF-8 (byte {exc.start:,} is {data[exc.start]:#04x})",
            expected="a UTF-8 text file",
            fix="convert it, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`",
        ) from None
    if not text.strip():
        raise RapError(f"--text {path} is empty", expected="text to measure perplexity on")
    return text, hashlib.sha256(data).hexdigest()


def text_windows(
    model: PrunableModel, path: str, window: int, max_tokens: int
) -> tuple[torch.Tensor, TextInfo]:
    """The windows of the file at `path` (module doc): ids [n, window] and what they are."""
    import torch  # lazy: heavy (torch)

    if window < 2:
        raise RapError(f"--ppl-seq-len {window} predicts nothing", expected="at least 2")
    text, digest = read_text(path)
    vocab = model.dims.vocab
    ids = encode(usable_tokenizer(model.tokenizer, vocab), text, vocab)
    step = window - 1
    if len(ids) < step:
        raise RapError(
            f"--text {path} is {len(ids):,} tokens, shorter than one window's {step:,}",
            expected=f"at least {step:,} tokens for --ppl-seq-len {window}",
            fix=f"pass --ppl-seq-len {len(ids) + 1} or less, or a longer file",
        )
    n = min(len(ids) // step, max(1, max_tokens // window))
    bos = bos_id(model)
    rows = [[bos, *ids[i * step : (i + 1) * step]] for i in range(n)]
    info = TextInfo(
        source=f"file:{Path(path).name}",
        text_sha256=digest,
        seq_len=window,
        chunks=n,
        tokens=n * window,
        stride=step,
    )
    return torch.tensor(rows, dtype=torch.long), info
