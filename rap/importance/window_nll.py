"""NLL per window of masks on the protocol's windows (`rap.importance.heldout`), cached on disk.

One JSON line per (model, mask key, window): `{"model", "key", "window", "nll", "domain",
"split", "length", "start"}`, where `model` names the weights and the compute dtype
(`model_identity`), `window` is the window's digest (`Windows.digests`: a digest of its token
ids, BOS included) and `nll` sums −log p over its `length − 1` predicted tokens. The last four
fields are for people reading the file; the key is (model, key, window) alone, so a window
whose ids are unchanged is never measured twice, whichever selection asks for it, and a changed
text or tokenizer never meets an old number.

Windows are measured a batch at a time and each batch's lines are appended (and flushed) as
soon as they exist, so a run that is killed resumes at the first batch it had not written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rap.core.errors import RapError
from rap.core.loading import cache_dir
from rap.core.masks import KeepMask, keep_of
from rap.importance.heldout import Windows

if TYPE_CHECKING:
    from rap.core.model import PrunableModel

CacheKey = tuple[str, str, str]
"""(model identity, mask key, window digest)."""
Progress = Callable[[int], None]
"""Called with the number of windows just measured or found in the cache."""


def default_path(model_id: str) -> Path:
    return cache_dir() / "quality" / f"{model_id}.windows.jsonl"


def model_identity(model: PrunableModel) -> str:
    """The weights (a digest of the safetensors files where there are files, else the model
    id: random weights are seeded from their preset) and the compute dtype: NLL in float16
    and float32 differ, so they never share a cache line."""
    from rap.importance.scorers import model_digest  # lazy: heavy (torch, transformers)

    try:
        weights = f"{model.model_id}@{model_digest(model)[:16]}"
    except RapError:
        weights = model.model_id
    dtype = str(model.dtype).removeprefix("torch.")
    return f"{weights}/{dtype}"


def read_rows(path: Path) -> dict[CacheKey, float]:
    """Every measurement in a cache file. A last line cut short by a kill is skipped (its
    batch is measured again)."""
    out: dict[CacheKey, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                out[(r["model"], r["key"], r["window"])] = float(r["nll"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


class WindowMeter:
    """NLL per window of mask keys ("" = dense), from the cache or measured; `computed` counts
    the windows this meter measured (0 when everything came from the cache)."""

    def __init__(self, model: PrunableModel, path: Path | None = None, batch_size: int = 4) -> None:
        self.model = model
        self.identity = model_identity(model)
        self.path = path or default_path(model.model_id)
        self.known = read_rows(self.path)
        self.batch_size = batch_size
        self.computed = 0

    def missing(self, key: str, w: Windows) -> list[int]:
        """Indices of the windows of `w` with no cached NLL under `key`."""
        return [i for i, d in enumerate(w.digests) if (self.identity, key, d) not in self.known]

    def nll(self, key: str, w: Windows, progress: Progress | None = None) -> list[float]:
        """NLL of each window of `w` under the mask `key`, in `w`'s order."""
        todo = self.missing(key, w)
        if progress and len(todo) < len(w.digests):
            progress(len(w.digests) - len(todo))
        for first in range(0, len(todo), self.batch_size):
            batch = todo[first : first + self.batch_size]
            self._measure(key, w, batch)
            if progress:
                progress(len(batch))
        return [self.known[(self.identity, key, d)] for d in w.digests]

    def _measure(self, key: str, w: Windows, batch: list[int]) -> None:
        from rap.importance.nll import NllEvaluator  # lazy: heavy (torch, transformers)

        model = self.model
        attn, mlp = keep_of(key, model.num_layers)
        mask = KeepMask(model=model.model_id, attn=attn, mlp=mlp)
        mask = mask.model_copy(update={"version": model.mask.version})
        run = NllEvaluator(model, w.ids[batch], len(batch)).run(mask)
        values = [float(x) for b in sorted(run.chunk_nll) for x in run.chunk_nll[b]]
        self.computed += len(values)
        _end_last_line(self.path)
        with self.path.open("a") as f:
            for i, value in zip(batch, values, strict=True):
                self.known[(self.identity, key, w.digests[i])] = value
                row = {"model": self.identity, "key": key, "window": w.digests[i], "nll": value}
                row.update(domain=w.domain, split=w.split, length=w.window, start=w.starts[i])
                f.write(json.dumps(row) + "\n")
            f.flush()


def _end_last_line(path: Path) -> None:
    """A last line a kill cut short gets its newline, or the next line appended would join it
    and be lost with it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        size = f.seek(0, 2)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")


def lnppl(nll: list[float], window: int) -> float:
    """Mean NLL per predicted token over windows of `window` tokens: ln perplexity."""
    return sum(nll) / (len(nll) * (window - 1))
