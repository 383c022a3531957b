"""Quality of masks: perplexity on the perplexity text and zero-shot accuracy (`rap eval`).

Perplexity is exp(mean NLL) over non-overlapping chunks of the Wikipedia text
(`rap.importance.calibration`, disjoint from the C4 calibration text that scored the blocks).
Zero-shot accuracy follows lm-evaluation-harness's log-likelihood protocol
(`rap.importance.zeroshot`). Each distinct mask is evaluated once, even when several (budget,
method) rows share it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rap.core.masks import KeepMask
from rap.core.model import PrunableModel
from rap.core.scores import TextInfo
from rap.importance.calibration import encode, perplexity_chunks, usable_tokenizer
from rap.importance.nll import NllEvaluator
from rap.importance.zeroshot import NORMED, Item, interval95, load_task

Progress = Callable[[int, int, str], None]


@dataclass
class MaskQuality:
    """Perplexity and per-task scores of one mask."""

    ppl: float
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def split_pair(tokenizer: Any, ctx: str, cont: str, vocab: int) -> tuple[list[int], list[int]]:
    """The harness's `_encode_pair`: trailing spaces of the context move to the continuation,
    and the continuation's tokens are enc(ctx + cont)[len(enc(ctx)):]."""
    spaces = len(ctx) - len(ctx.rstrip())
    if spaces:
        ctx, cont = ctx[:-spaces], ctx[-spaces:] + cont
    whole = encode(tokenizer, ctx + cont, vocab)
    head = encode(tokenizer, ctx, vocab)
    return head, whole[len(head) :]


def loglikelihoods(
    model: PrunableModel,
    requests: Sequence[tuple[str, str]],
    max_len: int = 2048,
    batch_tokens: int = 2048,
) -> list[tuple[float, bool]]:
    """Per request: Σ log p(continuation | context) and whether every continuation token is the
    greedy argmax. Requests run longest first in right-padded batches of ≤ `batch_tokens`."""
    tok = usable_tokenizer(model.tokenizer, model.dims.vocab)
    pairs = [split_pair(tok, c, x, model.dims.vocab) for c, x in requests]
    # Keep the last max_len + 1 tokens; the input is all but the last one.
    seqs = [(h + c)[-(max_len + 1) :] for h, c in pairs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    start = 0
    while start < len(order):
        width = len(seqs[order[start]]) - 1
        size = max(1, batch_tokens // max(width, 1))
        idx = order[start : start + size]
        done = _batch(model, [seqs[i] for i in idx], [pairs[i][1] for i in idx])
        for i, res in zip(idx, done, strict=True):
            out[i] = res
        start += size
    return out


def _batch(
    model: PrunableModel, seqs: list[list[int]], conts: list[list[int]]
) -> list[tuple[float, bool]]:
    width = max(len(s) for s in seqs) - 1
    pad = model.pad_id()
    ids = torch.tensor([s[:-1] + [pad] * (width - len(s) + 1) for s in seqs])
    mask = torch.tensor([[1] * (len(s) - 1) + [0] * (width - len(s) + 1) for s in seqs])
    with torch.inference_mode():
        logits = model.hf(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False
        ).logits
    results = []
    for row, (s, cont) in enumerate(zip(seqs, conts, strict=True)):
        n = min(len(cont), len(s) - 1)
        end = len(s) - 1
        logp = torch.log_softmax(logits[row, end - n : end].float(), dim=-1)
        target = torch.tensor(s[-n:], device=logp.device)
        ll = float(logp.gather(-1, target[:, None]).sum())
        greedy = bool((logp.argmax(-1) == target).all())
        results.append((ll, greedy))
    return results


def score_task(model: PrunableModel, task: str, items: list[Item]) -> dict[str, float]:
    """acc (and acc_norm where the harness reports it) of `model` under its current mask."""
    flat = [r for item in items for r in item.requests]
    lls = loglikelihoods(model, flat)
    right = right_norm = 0
    pos = 0
    for item in items:
        got = lls[pos : pos + len(item.requests)]
        pos += len(item.requests)
        if task == "lambada":
            right += got[0][1]
            continue
        scores = [ll for ll, _ in got]
        right += max(range(len(scores)), key=scores.__getitem__) == item.gold
        normed = [ll / max(n, 1) for ll, n in zip(scores, item.lengths, strict=True)]
        right_norm += max(range(len(normed)), key=normed.__getitem__) == item.gold
    n = len(items)
    res = {"acc": right / n, "n": float(n), "ci95": interval95(right / n, n)}
    if task in NORMED:
        res["acc_norm"] = right_norm / n
        res["ci95_norm"] = interval95(right_norm / n, n)
    return res


def perplexity(model: PrunableModel, ids: torch.Tensor, mask: KeepMask, batch: int = 2) -> float:
    """exp(mean NLL) of `mask` on the chunks `ids` (the perplexity text)."""
    ev = NllEvaluator(model, ids, batch)
    return ev.perplexity(ev.run(mask).total)


def evaluate_masks(
    model: PrunableModel,
    masks: Sequence[KeepMask],
    tasks: Sequence[str],
    limit: int | None,
    ppl_tokens: int,
    ppl_seq_len: int,
    progress: Progress | None = None,
    cache: Path | None = None,
    text_ids: tuple[torch.Tensor, TextInfo] | None = None,
) -> list[MaskQuality]:
    """Perplexity and zero-shot scores of every mask (each distinct mask once).

    `cache`: a JSON file of earlier results for this model, keyed by mask, text and items, so a
    rerun with more methods or budgets evaluates only the new masks. `text_ids`: the windows
    and description of another text than the perplexity text (`rap eval --text`).
    """
    if text_ids is None:
        vocab = model.dims.vocab
        text_ids = perplexity_chunks(model.tokenizer, ppl_seq_len, ppl_tokens, vocab)
    ids, text = text_ids
    items = {t: load_task(t, limit) for t in tasks}
    stored = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    out = []
    for i, mask in enumerate(masks):
        bits = "".join("1" if k else "0" for k in (*mask.attn, *mask.mlp))
        key = f"{bits}|{text.key}|{limit}|{','.join(tasks)}"
        if key not in stored:
            t0 = time.perf_counter()
            quality = MaskQuality(ppl=perplexity(model, ids, mask))
            model.apply(mask)
            for task in tasks:
                quality.tasks[task] = score_task(model, task, items[task])
            quality.seconds = time.perf_counter() - t0
            stored[key] = asdict(quality)
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(stored))
        out.append(MaskQuality(**stored[key]))
        if progress:
            progress(i + 1, len(masks), f"ppl {out[-1].ppl:.2f}")
    model.apply(model.dense_mask())
    return out
