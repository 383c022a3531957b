"""Measured perplexity of the real model under keep-masks: the ground truth of the agent's reward.

A mask is written as its dropped blocks, `"a3,a25,m10"` (attention of layer 3 and 25, MLP of
layer 10; `""` is the dense model). Its quality is the mean negative log-likelihood per
predicted token of the perplexity text (`rap.importance.calibration`, Wikipedia), in nats:

    lnppl(mask) = NLL(mask) / (chunks · (T − 1)),    perplexity = exp(lnppl)

measured with `rap.importance.nll.NllEvaluator` on two disjoint slices of that text, so the
masks a policy is judged on are scored on tokens its training signal never saw:

    eval  tokens [512, 1536)   as 4 chunks of 256: what `bench/compare_policies.py` reports
    fit   tokens [1536, 3584)  as 8 chunks of 256: what `rap.planning.surrogate` is fitted to

Why the fit text is 2,048 tokens: docs/agent.md. Every measurement is appended to a JSON-lines cache
named by the part's token range (`cache_dir()/quality/<model>.<part>.<first>-<last chunk>.jsonl`),
so runs resume, masks are never measured twice and a part whose range changes never mixes texts;
`export` writes the compact table that ships in `rap/data/<model>.lnppl-<part>.json` (a few hundred
masks, tens of KB), which records its range: a table for another range is refused. `export` merges
the cache into the table that ships (it never replaces it: a new machine's cache holds only its own
few measurements) and refuses to shrink it unless told (`--replace`).

Run: `python -m rap.importance.quality measure --part fit --count 240 --threads 2` (~6 s a mask
on two CPU threads), then `python -m rap.importance.quality export --part fit`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rap.core.constants import DATA_DIR
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL_ID, cache_dir, load_model
from rap.core.masks import Block, KeepMask, keep_of, key_for
from rap.core.scores import find_scores
from rap.importance.calibration import PERPLEXITY_SOURCE, encode, text_of, usable_tokenizer
from rap.importance.doc_text import PREFIX_CHARS

SEQ_LEN = 256
PARTS = {"eval": (2, 6), "fit": (6, 14), "served": (16, 32)}
"""part → [first, last) chunk of SEQ_LEN tokens of the perplexity text."""
WINDOW = {"served": 1024}
"""Tokens per window where a part is measured in longer windows than SEQ_LEN: `served`
(`rap bench`'s measured quality) in windows at least as long as the sequences it serves."""


# -- tables -----------------------------------------------------------------------------------
def table_path(model_id: str, part: str) -> Path:
    return DATA_DIR / f"{model_id}.lnppl-{part}.json"


def cache_path(model_id: str, part: str) -> Path:
    lo, hi = PARTS[part]
    return cache_dir() / "quality" / f"{model_id}.{part}.{lo}-{hi}.jsonl"


def read_cache(model_id: str, part: str) -> dict[str, float]:
    """Every measurement so far: key → ln perplexity (later lines win)."""
    path = cache_path(model_id, part)
    out: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[row["key"]] = float(row["lnppl"])
    return out


def read_shipped(model_id: str, part: str) -> dict[str, float]:
    """The shipped table alone (key → lnppl; empty if none ships), refused if it was measured
    on another range of the text."""
    path = table_path(model_id, part)
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    if doc["text"]["chunks"] != list(PARTS[part]):
        raise RapError(
            f"{path} was measured on chunks {doc['text']['chunks']} of the text, "
            f"the {part} part is now chunks {list(PARTS[part])}",
            fix=f"re-measure: python -m rap.importance.quality measure --part "
            f"{part}, then python -m rap.importance.quality export --part "
            f"{part} --replace",
        )
    return {k: float(v) for k, v in doc["lnppl"].items()}


def load_table(model_id: str = DEFAULT_MODEL_ID, part: str = "fit") -> dict[str, float]:
    """The shipped table of ln perplexities (key → lnppl), merged with the local cache."""
    table = read_shipped(model_id, part)
    table.update(read_cache(model_id, part))
    if not table:
        raise RapError(
            f"no measured perplexities for {model_id} ({part})",
            fix=f"run `python -m rap.importance.quality measure --part {part}`",
        )
    return table


def export(model_id: str, part: str, replace: bool = False) -> tuple[Path, int, int]:
    """Write the shipped table: the table that ships now merged with the local cache (cache wins
    on a key both hold), keys sorted, 4 decimals (~20 bytes a mask). Returns (path, masks
    before, masks after). `replace`: write the cache alone, even if that shrinks the table or
    the shipped one was measured on another range; without it a smaller table is refused
    (a fresh machine's cache holds only its own few measurements)."""
    path = table_path(model_id, part)
    before = len(json.loads(path.read_text())["lnppl"]) if path.is_file() else 0
    shipped = {} if replace else read_shipped(model_id, part)
    rows = {**shipped, **read_cache(model_id, part)}
    if len(rows) < before and not replace:
        raise RapError(
            f"exporting would shrink {path.name} from {before} to {len(rows)} masks",
            fix="pass --replace to write the cache alone",
        )
    lo, hi = PARTS[part]
    doc = {
        "format": "rap-lnppl/1",
        "model": model_id,
        "text": {"source": "wiki", "seq_len": SEQ_LEN, "chunks": [lo, hi]},
        "unit": "mean NLL per predicted token, nats (ln perplexity), float32 on CPU",
        "lnppl": {k: round(v, 4) for k, v in sorted(rows.items(), key=lambda kv: len(kv[0]))},
    }
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return path, before, len(rows)


# -- measuring --------------------------------------------------------------------------------
class Meter:
    """Measures ln perplexity of masks on one part of the perplexity text, with the cache."""

    def __init__(self, model: Any, part: str = "fit") -> None:
        from rap.importance.nll import NllEvaluator  # lazy: heavy (torch, transformers)

        if part not in PARTS:
            raise RapError(f"unknown text part {part!r}", expected=f"one of {sorted(PARTS)}")
        self.model, self.part = model, part
        ids = part_ids(model, part)
        self.ev = NllEvaluator(model, ids, batch_size=int(ids.shape[0]))
        self.known = read_cache(model.model_id, part)
        self.path = cache_path(model.model_id, part)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def lnppl(self, key: str) -> float:
        """ln perplexity of the mask `key` (cached, else one forward pass over the part)."""
        if key not in self.known:
            attn, mlp = keep_of(key, self.model.num_layers)
            mask = KeepMask(model=self.model.model_id, attn=attn, mlp=mlp)
            value = self.ev.run(mask).total / self.ev.predicted
            self.known[key] = value
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "lnppl": value}) + "\n")
        return self.known[key]


def part_ids(model: Any, part: str) -> Any:
    """Token ids of one part, [windows, WINDOW or SEQ_LEN]: contiguous from the start of the
    perplexity text, tokenized here (not through `rap.importance.calibration.chunks`, whose
    sampling may change), so the shipped tables keep meaning the same tokens."""
    import torch  # lazy: heavy (torch)

    lo, hi = PARTS[part]
    vocab = model.dims.vocab
    # A prefix of the text tokenizes like the whole text well before its cut (~20K tokens).
    # The held-out protocol and the test split skip every document that begins in this prefix.
    prefix = text_of(PERPLEXITY_SOURCE)[:PREFIX_CHARS]
    stream = encode(usable_tokenizer(model.tokenizer, vocab), prefix, vocab)[: hi * SEQ_LEN]
    if len(stream) < hi * SEQ_LEN:
        raise RapError(f"the perplexity text gave {len(stream)} tokens, fewer than {hi * SEQ_LEN}")
    window = WINDOW.get(part, SEQ_LEN)
    return torch.tensor(stream[lo * SEQ_LEN :], dtype=torch.long).view(-1, window)


def sample_keys(scores: dict[Block, float], count: int, seed: int, max_drops: int) -> list[str]:
    """Masks to fit a surrogate on: every single drop, then `count` drop sets of 2..max_drops
    blocks, 80 % drawn Gumbel-top-k on −rank/τ of the stored scores with τ ~ U(2, 30) (where
    planners and policies go: mostly unimportant blocks) and 20 % uniformly (the rest)."""
    rng = random.Random(seed)
    blocks = sorted(scores)
    rank = {b: r for r, b in enumerate(sorted(blocks, key=lambda b: scores[b]))}
    keys = [key_for([b]) for b in blocks]
    while len(keys) < count + len(blocks):
        k = rng.randint(2, max_drops)
        if rng.random() < 0.8:
            tau = rng.uniform(2.0, 30.0)
            noisy = {b: -rank[b] / tau - math.log(-math.log(rng.random())) for b in blocks}
            chosen = sorted(blocks, key=lambda b: -noisy[b])[:k]
        else:
            chosen = rng.sample(blocks, k)
        keys.append(key_for(chosen))
    return list(dict.fromkeys(keys))


def read_keys(path: str | Path) -> list[str]:
    """Mask keys from a file, one a line (blank lines skipped)."""
    return [k.strip() for k in Path(path).read_text().splitlines() if k.strip()]


def _stored_scores(model_id: str) -> dict[Block, float]:
    """The best stored scores for sampling: gsi, else oneshot, else bi."""

    for kind in ("gsi", "oneshot", "bi"):
        try:
            s = find_scores(model_id, kind)
        except RapError:
            continue
        return s.costs()
    raise RapError(f"no stored scores for {model_id}", fix="run `rap importance` first")


def _measure(args: argparse.Namespace) -> int:
    import torch  # lazy: heavy (torch)

    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32", device="cpu")
    meter = Meter(model, args.part)
    if args.keys:
        keys = read_keys(args.keys)
    else:
        keys = sample_keys(_stored_scores(model.model_id), args.count, args.seed, args.max_drops)
    keys = ["", *keys]
    todo = [k for k in keys if k not in meter.known]
    start = time.time()
    for done, key in enumerate(todo, 1):
        value = meter.lnppl(key)
        if done % 10 == 0 or done == len(todo):
            rate = (time.time() - start) / done
            print(
                f"{done}/{len(todo)} {rate:.2f} s/mask  {key or 'dense'}: {value:.3f}", flush=True
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rap.importance.quality", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="measure sampled masks (or --keys FILE) into the cache")
    m.add_argument("--model", default="smollm2")
    m.add_argument("--part", default="fit", choices=sorted(PARTS))
    m.add_argument("--count", type=int, default=400, help="sampled drop sets beyond single drops")
    m.add_argument("--max-drops", type=int, default=14)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--keys", help="a file of mask keys to measure instead, one a line")
    m.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("export", help="merge the cache into the shipped table")
    e.add_argument("--part", default="fit", choices=sorted(PARTS))
    e.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    e.add_argument(
        "--replace", action="store_true", help="write the cache alone (may shrink the table)"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            path, before, after = export(args.model_id, args.part, args.replace)
            print(f"{path}: {before} → {after} masks")
            return 0
        return _measure(args)
    except RapError as exc:
        print(f"python -m rap.importance.quality {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
