"""The test split's text: whole documents of two domains no score, fit or tuning step read.

    wiki  documents of the perplexity text (`wiki.utf8`) that begin after its first
          PREFIX_CHARS characters: the surrogate's fit part and the validation's eval part
          (`rap.importance.quality.PARTS`) are tokens [512, 3,584) of that prefix
    c4    documents of the calibration text (`c4.utf8`) that no chunk of the shipped block
          scores touches (each score file names its chunks: `calibration.seq_len`, `chunks`,
          `stride`), found through the tokenizer's character offsets

Each domain gives the first DOC_TOKENS tokens of its first DOCS such documents, in file order
(shorter documents are skipped): DOCS · (DOC_TOKENS − 1) = 8,415 predicted tokens a domain. A
mask's result is one NLL per document (nats, summed over its predicted tokens), so intervals
can resample documents:

    lnppl_domain(mask) = Σ_docs NLL / (DOCS · (DOC_TOKENS − 1)),   lnppl = mean over domains

Results are cached per mask key in `cache_dir()/quality/<model>.test-docs.jsonl`, each line
with the digest of the token ids, so a different selection never mixes with an old one.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from rap.core.constants import DATA_DIR
from rap.core.errors import RapError
from rap.core.loading import cache_dir
from rap.core.masks import KeepMask, keep_of
from rap.importance.calibration import (
    CALIBRATION_SOURCE,
    PERPLEXITY_SOURCE,
    documents,
    encode,
    usable_tokenizer,
)

DOMAINS = {"wiki": PERPLEXITY_SOURCE, "c4": CALIBRATION_SOURCE}
DOC_TOKENS = 256
DOCS = 33
PREFIX_CHARS = 80_000
SEPARATOR = "\n\n"  # `calibration.text_of` joins documents with it


def doc_starts(docs: tuple[str, ...]) -> list[int]:
    """Character offset of each document in the joined text."""
    starts, pos = [], 0
    for d in docs:
        starts.append(pos)
        pos += len(d) + len(SEPARATOR)
    return starts


def token_chars(tokenizer: Any, text: str, vocab: int) -> list[tuple[int, int]]:
    """(first, last + 1) character of each token of `text`, as `calibration.encode` cuts it;
    without a tokenizer each UTF-8 byte is a token of its character."""
    if tokenizer is None:
        return [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(o) for o in enc["offset_mapping"]]


def touched_docs(spans: list[tuple[int, int]], starts: list[int], chunks: list[dict]) -> set[int]:
    """Documents any calibration chunk reads: chunk c covers tokens [c·stride, c·stride + T)."""
    touched: set[int] = set()
    for spec in chunks:
        for c in range(spec["chunks"]):
            first = c * spec["stride"]
            last = min(first + spec["seq_len"], len(spans)) - 1
            lo = bisect.bisect_right(starts, spans[first][0]) - 1
            hi = bisect.bisect_right(starts, spans[last][1] - 1) - 1
            touched.update(range(lo, hi + 1))
    return touched


def calibration_specs(model_id: str, source: str = CALIBRATION_SOURCE) -> list[dict]:
    """The chunks every shipped score file of `model_id` read from the text `source`."""
    specs = []
    for path in sorted(DATA_DIR.glob(f"{model_id}.*.json")):
        cal = json.loads(path.read_text()).get("calibration")
        if isinstance(cal, dict) and cal.get("source") == source:
            if cal.get("half") is not None:
                raise RapError(
                    f"{path.name} was computed on half {cal['half']} of the calibration text",
                    expected="whole-text calibration chunks (the test text excludes them)",
                )
            specs.append(cal)
    return specs


def candidates(domain: str, tokenizer: Any, vocab: int, model_id: str) -> list[int]:
    """Indices of the documents of `domain` that the test text may use (module doc)."""
    docs = documents(DOMAINS[domain])
    starts = doc_starts(docs)
    if domain == "wiki":
        read = {i for i, s in enumerate(starts) if s < PREFIX_CHARS}
    else:
        spans = token_chars(tokenizer, SEPARATOR.join(docs), vocab)
        read = touched_docs(spans, starts, calibration_specs(model_id))
    return unread(docs, read)


def unread(docs: Sequence[str], read: Iterable[int]) -> list[int]:
    """Indices of the documents not in `read`, without copies: c4.utf8 repeats some documents,
    so a copy of a read document is read too, and a document kept once is not kept again."""
    seen = {docs[i] for i in read}
    out = []
    for i, doc in enumerate(docs):
        if doc not in seen:
            out.append(i)
            seen.add(doc)
    return out


def chosen_docs(domain: str, tok: Any, vocab: int, model_id: str) -> list[tuple[int, list[int]]]:
    """The test split's documents of `domain`: (index, first DOC_TOKENS ids) of the first DOCS
    candidates with at least DOC_TOKENS tokens."""
    docs = documents(DOMAINS[domain])
    rows = []
    for i in candidates(domain, tok, vocab, model_id):
        ids = encode(tok, docs[i], vocab)
        if len(ids) >= DOC_TOKENS:
            rows.append((i, ids[:DOC_TOKENS]))
        if len(rows) == DOCS:
            break
    if len(rows) < DOCS:
        raise RapError(
            f"the {domain} test text has {len(rows)} usable documents",
            expected=f"{DOCS} of at least {DOC_TOKENS} tokens",
        )
    return rows


def doc_ids(model: Any) -> tuple[dict[str, Any], str]:
    """Per domain the [DOCS, DOC_TOKENS] token ids, and their digest."""
    import torch  # lazy: heavy (torch)

    vocab = model.dims.vocab
    tok = usable_tokenizer(model.tokenizer, vocab)
    out, digest = {}, hashlib.sha256()
    for domain in DOMAINS:
        rows = [ids for _, ids in chosen_docs(domain, tok, vocab, model.model_id)]
        out[domain] = torch.tensor(rows, dtype=torch.long)
        digest.update(json.dumps(rows).encode())
    return out, digest.hexdigest()[:16]


class DocMeter:
    """Per-document NLL of masks on the test text, cached by mask key."""

    def __init__(self, model: Any) -> None:
        from rap.importance.nll import NllEvaluator  # lazy: heavy (torch, transformers)

        self.model = model
        ids, self.digest = doc_ids(model)
        self.evaluators = {d: NllEvaluator(model, x, batch_size=11) for d, x in ids.items()}
        self.path = cache_dir() / "quality" / f"{model.model_id}.test-docs.jsonl"
        self.known: dict[str, dict[str, list[float]]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row["digest"] == self.digest:
                    self.known[row["key"]] = {d: row[d] for d in DOMAINS}

    def nll(self, key: str) -> dict[str, list[float]]:
        """NLL per document and domain of the mask `key` ("" = dense)."""
        if key not in self.known:
            attn, mlp = keep_of(key, self.model.num_layers)
            mask = KeepMask(model=self.model.model_id, attn=attn, mlp=mlp)
            mask = mask.model_copy(update={"version": self.model.mask.version})
            result = {}
            for domain, ev in self.evaluators.items():
                run = ev.run(mask)
                result[domain] = [float(x) for b in sorted(run.chunk_nll) for x in run.chunk_nll[b]]
            self.known[key] = result
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "digest": self.digest, **result}) + "\n")
        return self.known[key]


def lnppl(nll: dict[str, list[float]]) -> float:
    """Mean over domains of Σ NLL / predicted tokens (module doc)."""
    per = [sum(v) / (len(v) * (DOC_TOKENS - 1)) for v in nll.values()]
    return sum(per) / len(per)


def bootstrap_pairs(
    nll: dict[str, dict[str, list[float]]],
    pairs: list[tuple[str, str]],
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean lnppl(a) − lnppl(b) over situations whose masks are `pairs` (a, b), with a 95 %
    interval that carries both noises: each draw resamples the documents of every domain
    (the text's noise) and the situations by cluster, a cluster being one distinct (a, b)
    pair (situations with the same two masks are not independent evidence)."""
    import numpy as np  # lazy: only for reports

    keys = sorted({k for p in pairs for k in p})
    index = {k: i for i, k in enumerate(keys)}
    # table[k, domain, doc]: NLL of key k on one document.
    table = np.array([[nll[k][d] for d in DOMAINS] for k in keys])
    clusters: dict[tuple[str, str], int] = {}
    for p in pairs:
        clusters[p] = clusters.get(p, 0) + 1
    a = np.array([index[p[0]] for p in clusters])
    b = np.array([index[p[1]] for p in clusters])
    size = np.array(list(clusters.values()), dtype=float)
    rng = np.random.default_rng(seed)
    n_docs, n_clusters = table.shape[2], len(clusters)
    stats = np.empty(draws)
    for r in range(draws):
        docs = rng.integers(0, n_docs, (len(DOMAINS), n_docs))
        picked = np.take_along_axis(table, np.broadcast_to(docs, table.shape[:1] + docs.shape), 2)
        ln = picked.sum(2).mean(1) / (n_docs * (DOC_TOKENS - 1))
        weight = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters) * size
        stats[r] = float((weight * (ln[a] - ln[b])).sum() / weight.sum())
    ln_all = table.sum(2).mean(1) / (n_docs * (DOC_TOKENS - 1))
    point = float((size * (ln_all[a] - ln_all[b])).sum() / size.sum())
    return {
        "mean_diff": point,
        "ci95": [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))],
        "clusters": n_clusters,
        "documents_per_domain": n_docs,
    }
