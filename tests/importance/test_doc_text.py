"""The test split's text (`rap.importance.doc_text`): documents nothing else read, NLL per document,
intervals over documents and clustered mask pairs."""

from __future__ import annotations

import math

import numpy as np

from rap.core.loading import DEFAULT_MODEL_ID, load_model
from rap.importance import doc_text as tt
from rap.importance.calibration import CALIBRATION_SOURCE, documents


def test_no_c4_test_document_is_one_a_calibration_chunk_read() -> None:
    """Byte tokens stand in for the tokenizer: the rule is the same for any tokenization. The
    documents under each shipped score file's chunks are found independently, byte by byte."""
    docs = documents(CALIBRATION_SOURCE)
    owner: list[int] = []  # the document of every byte of the joined text
    for i, d in enumerate(docs):
        owner += [i] * len(d.encode("utf-8"))
        if i < len(docs) - 1:
            owner += [-1] * len(tt.SEPARATOR)
    read = set()
    specs = tt.calibration_specs(DEFAULT_MODEL_ID)
    assert len(specs) == 3  # gsi, oneshot, bi
    for spec in specs:
        for c in range(spec["chunks"]):
            first = c * spec["stride"]
            read |= set(owner[first : first + spec["seq_len"]]) - {-1}
    picked = tt.candidates("c4", None, 256, DEFAULT_MODEL_ID)
    assert picked and not set(picked) & read
    assert not {docs[i] for i in picked} & {docs[i] for i in read}  # nor a repeated copy
    assert len({docs[i] for i in picked}) == len(picked)


def test_wiki_test_documents_begin_after_the_fit_and_eval_text() -> None:
    docs = documents("wiki")
    starts = tt.doc_starts(docs)
    picked = tt.candidates("wiki", None, 256, DEFAULT_MODEL_ID)
    assert min(starts[i] for i in picked) >= tt.PREFIX_CHARS
    assert len({docs[i] for i in picked}) == len(picked)


def test_doc_meter_measures_each_document_once_and_caches(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path))
    model = load_model(str(tiny_dirs["llama"]))
    meter = tt.DocMeter(model)
    dense, dropped = meter.nll(""), meter.nll("a1,m2")
    assert all(len(dense[d]) == tt.DOCS for d in tt.DOMAINS)
    assert dense != dropped and math.isfinite(tt.lnppl(dropped))
    again = tt.DocMeter(model)  # from the cache on disk
    assert again.known == {"": dense, "a1,m2": dropped}


def test_bootstrap_carries_document_noise_and_clusters_repeated_pairs() -> None:
    rng = np.random.default_rng(0)
    base = rng.gamma(4.0, 200.0, (2, tt.DOCS))
    noisy = base * rng.normal(1.0, 0.3, base.shape)  # b differs from a document by document
    nll = {
        "a": {d: list(base[i]) for i, d in enumerate(tt.DOMAINS)},
        "b": {d: list(noisy[i]) for i, d in enumerate(tt.DOMAINS)},
        "c": {d: list(base[i] * 1.01) for i, d in enumerate(tt.DOMAINS)},
    }
    one = tt.bootstrap_pairs(nll, [("a", "b")], draws=400)
    assert math.isclose(one["mean_diff"], tt.lnppl(nll["a"]) - tt.lnppl(nll["b"]))
    lo, hi = one["ci95"]
    assert lo < one["mean_diff"] < hi and hi - lo > 0.01  # the text's noise is in it
    same = tt.bootstrap_pairs(nll, [("a", "a")], draws=50)
    assert same["mean_diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
    # 9 situations of one pair and 1 of another: 2 clusters, weighted by their situations.
    mixed = tt.bootstrap_pairs(nll, [("a", "c")] * 9 + [("a", "b")], draws=400)
    assert mixed["clusters"] == 2
    expect = (9 * (tt.lnppl(nll["a"]) - tt.lnppl(nll["c"])) + one["mean_diff"]) / 10
    assert math.isclose(mixed["mean_diff"], expect)
