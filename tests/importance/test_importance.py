"""Calibration text, the fast NLL evaluator, the GSI search and the stored block scores."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from rap.cli.main import main
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL_ID, load_model
from rap.core.masks import KeepMask
from rap.core.scores import (
    METHODS,
    BlockScores,
    ScoresError,
    find_scores,
    load_default_scores,
)
from rap.importance import calibration
from rap.importance.nll import NllEvaluator
from rap.importance.scorers import ScoreSettings, block_influence, get_scores, magnitude
from rap.importance.search import exhaustive_gsi, gsi, one_shot
from tests.tiny import ARCHS


def _ids(model, tokens: int = 384, seq_len: int = 32) -> torch.Tensor:
    return calibration.calibration_chunks(model.tokenizer, seq_len, tokens, model.dims.vocab)[0]


def test_calibration_and_perplexity_texts_are_disjoint() -> None:
    cal, ppl = set(calibration.documents("c4")), set(calibration.documents("wiki"))
    assert len(cal) > 100 and len(ppl) > 2000 and not cal & ppl
    a, b = calibration.documents("c4", "a"), calibration.documents("c4", "b")
    assert a and b and not set(a) & set(b) and set(a) | set(b) == cal
    assert calibration.CALIBRATION_SOURCE != calibration.PERPLEXITY_SOURCE


def test_chunks_and_their_key() -> None:
    ids, info = calibration.calibration_chunks(None, 64, 1000, vocab_size=96)
    assert ids.shape == (15, 64) and info.tokens == 960 and int(ids.max()) < 96
    stream = calibration.encode(None, calibration.text_of("c4"), 96)
    assert info.stride == len(stream) // 15 >= 64  # spread over the text, not its first 960
    assert ids[3].tolist() == stream[3 * info.stride : 3 * info.stride + 64]
    assert info.key.startswith("c4-") and info.key.endswith("-960x64-spread")
    _, half = calibration.calibration_chunks(None, 64, 1000, 96, half="b")
    assert half.text_sha256 != info.text_sha256
    with pytest.raises(RapError, match="fewer than the"):
        calibration.calibration_chunks(None, 64, 10**8, 96)


@pytest.mark.parametrize("arch", ARCHS)
def test_runs_from_a_layer_equal_full_runs(arch, tiny_dirs) -> None:
    """Replaying captured states (and capturing the next base in passing) changes nothing."""
    model = load_model(str(tiny_dirs[arch]))
    ev = NllEvaluator(model, _ids(model), batch_size=4)
    dense = model.dense_mask()
    states, _ = ev.capture_all(dense.without(("mlp", 0)))
    for layer in range(1, model.num_layers):
        mask = dense.without(("mlp", 0), ("attn", layer))
        ref = NllEvaluator(model, _ids(model), batch_size=12).run(mask).total
        fast = ev.run(mask, layer, states, capture=True)
        assert math.isclose(fast.total, ref, rel_tol=1e-5), (layer, fast.total, ref)
        assert sorted(fast.captured) == list(range(layer + 1, model.num_layers))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_gsi_equals_the_exhaustive_search(arch, tiny_dirs, tmp_path) -> None:
    model = load_model(str(tiny_dirs[arch]))
    ids = _ids(model, 256)
    reference = exhaustive_gsi(NllEvaluator(model, ids, 4))
    exact = gsi(NllEvaluator(model, ids, 4), screen_batches=0)
    assert [(s.kind, s.layer) for s in exact.steps] == reference
    # Resuming from a checkpoint of the first three steps ends in the same order.
    ckpt = tmp_path / "gsi.json"
    gsi(NllEvaluator(model, ids, 4), screen_batches=0, checkpoint=ckpt)
    raw = json.loads(ckpt.read_text())
    raw["steps"] = raw["steps"][:3]
    ckpt.write_text(json.dumps(raw))
    resumed = gsi(NllEvaluator(model, ids, 4), screen_batches=0, checkpoint=ckpt)
    assert [(s.kind, s.layer) for s in resumed.steps] == reference
    # ... and its work counts add to the interrupted run's.
    assert resumed.runs > raw["runs"] and resumed.full_equivalents > raw["full_equivalents"]


def test_one_shot_is_the_first_gsi_step(tiny_dirs) -> None:
    model = load_model(str(tiny_dirs["qwen3"]))
    ev = NllEvaluator(model, _ids(model), 4)
    shot = one_shot(ev)
    dense = model.dense_mask()
    direct = NllEvaluator(model, _ids(model), 12).run(dense.without(("attn", 2))).total
    assert math.isclose(shot.nll[("attn", 2)], direct, rel_tol=1e-5)
    race = gsi(NllEvaluator(model, _ids(model), 4), screen_batches=1, finalists=2, first=shot)
    assert (race.steps[0].kind, race.steps[0].layer) == min(shot.nll, key=shot.nll.__getitem__)


def test_block_influence_matches_hidden_states(tiny_dirs) -> None:
    """Layer BI from hooks equals 1 − cos of transformers' own hidden states; an attention
    block's BI equals the layer's when the layer's MLP is dropped (same input, same output)."""
    model = load_model(str(tiny_dirs["gemma2"]))  # post-norms: the update is the post-norm's
    ids = _ids(model, 128)
    attn, mlp, layers = block_influence(model, ids, 4)

    def bi(mask: KeepMask, layer: int) -> float:
        model.apply(mask)
        with torch.inference_mode():
            hs = model.hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        cos = torch.nn.functional.cosine_similarity(hs[layer], hs[layer + 1], dim=-1)
        return 1.0 - float(cos.mean())

    dense = model.dense_mask()
    assert math.isclose(layers[1], bi(dense, 1), rel_tol=1e-4)
    assert math.isclose(attn[2], bi(dense.without(("mlp", 2)), 2), rel_tol=1e-4)
    assert attn != mlp and all(0.0 <= x <= 2.0 for x in (*attn, *mlp, *layers))


def test_magnitude_is_the_rms_of_each_block(tiny_dirs) -> None:
    model = load_model(str(tiny_dirs["llama"]))
    attn, _ = magnitude(model)
    layer = model.spec.layers(model.hf)[1]
    params = [*layer.input_layernorm.parameters(), *layer.self_attn.parameters()]
    flat = torch.cat([p.detach().flatten() for p in params])
    assert math.isclose(attn[1], float(flat.pow(2).mean().sqrt()), rel_tol=1e-5)


def test_shipped_scores_answer_when_model_text_method_and_tokens_match(
    tiny_dirs, tmp_path, monkeypatch
) -> None:
    """`rap importance` on a fresh machine: the package's scores answer at once (the user
    cache is empty); other tokens or a GSI race of other settings are computed."""
    import rap.core.scores
    import rap.importance.scorers

    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(rap.core.scores, "DATA_DIR", tmp_path / "data")
    (tmp_path / "data").mkdir()
    model = load_model(str(tiny_dirs["llama"]))
    settings = ScoreSettings(method="gsi", tokens=256, seq_len=32, screen_batches=1)
    computed, _ = get_scores(model, settings)
    rap.core.scores.shipped_path(model.model_id, "gsi").write_text(computed.to_json())
    shutil.rmtree(tmp_path / "cache")  # a fresh machine: nothing cached
    monkeypatch.setattr(rap.importance.scorers, "compute_scores", _no_compute)
    scores, origin = get_scores(model, settings)
    assert origin == "shipped" and scores == computed
    for other in (
        ScoreSettings(method="gsi", tokens=512, seq_len=32, screen_batches=1),
        ScoreSettings(method="gsi", tokens=256, seq_len=32, finalists=2),
    ):
        with pytest.raises(AssertionError, match="computed"):
            get_scores(model, other)
    with pytest.raises(AssertionError, match="computed"):
        get_scores(model, settings, refresh=True)


def _no_compute(*_args, **_kw):
    raise AssertionError("computed instead of answered")


def test_scores_are_cached_and_validated(tiny_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path))
    model = load_model(str(tiny_dirs["phi3"]))
    settings = ScoreSettings(method="gsi", tokens=256, seq_len=32, screen_batches=1)
    first, origin = get_scores(model, settings)
    assert origin == "computed" and first.order is not None and len(first.order) == 8
    again, origin = get_scores(model, settings)
    assert origin == "cache" and again == first
    # Lookup by model id finds it, and skips a GSI run still in progress beside it.
    found = next(tmp_path.glob("scores/*/gsi-*.json"))
    found.with_name(found.name.replace(".json", "-x.partial.json")).write_text("{}")
    assert find_scores(first.model, "gsi") == first
    # Marginal costs add up to the perplexity of the last step.
    assert first.dense_ppl is not None
    total = math.log(first.dense_ppl) + sum(first.attn) + sum(first.mlp)
    assert math.isclose(total, math.log(first.order[-1].ppl), rel_tol=1e-6)
    bad = json.loads(first.to_json())
    bad["order"] = bad["order"][:-1]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ScoresError, match="every block exactly once"):
        BlockScores.from_file(path)


def test_importance_command(tiny_dirs, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path))
    model = str(tiny_dirs["mistral"])
    args = ["importance", "--model", model, "--tokens", "256", "--seq-len", "32", "--json"]
    assert main([*args, "--method", "oneshot"]) == 0
    shot = BlockScores.model_validate_json(capsys.readouterr().out)
    assert shot.method == "oneshot" and shot.calibration and shot.calibration.tokens == 256
    assert main([*args, "--method", "bi", "--tokens", "16"]) == 2
    assert "below --seq-len" in capsys.readouterr().err


@pytest.mark.parametrize("method", METHODS)
def test_shipped_scores_load(method) -> None:
    scores = load_default_scores(method)
    assert scores.model == DEFAULT_MODEL_ID and scores.num_layers == 30
    assert len(set(scores.removal_order())) == 60
    if method != "magnitude":
        assert scores.calibration and scores.calibration.source == calibration.CALIBRATION_SOURCE
        assert scores.calibration.tokens >= 8192 and scores.calibration.half is None


def test_shipped_gsi_is_the_whole_greedy_order() -> None:
    """Every block in the order once, each step's ppl recorded, marginal costs adding up to the
    last step, all on the same calibration text as the one-shot scores."""
    gsi_scores, shot = load_default_scores("gsi"), load_default_scores("oneshot")
    assert gsi_scores.order is not None and len(gsi_scores.order) == 60
    assert gsi_scores.calibration == shot.calibration and gsi_scores.dense_ppl is not None
    total = math.log(gsi_scores.dense_ppl) + sum(gsi_scores.attn) + sum(gsi_scores.mlp)
    assert math.isclose(total, math.log(gsi_scores.order[-1].ppl), rel_tol=1e-6)
    assert shot.dense_ppl is not None and math.isclose(
        shot.dense_ppl, gsi_scores.dense_ppl, rel_tol=1e-4
    )


@pytest.mark.slow
def test_shipped_scores_belong_to_the_default_model() -> None:
    """The digest matches the converted weights, and Block Influence recomputed on 1K tokens
    ranks blocks like the shipped scores (8K tokens)."""
    from scipy.stats import spearmanr

    from rap.importance.scorers import model_digest

    model = load_model("smollm2")
    shipped = load_default_scores("bi")
    assert model_digest(model) == shipped.model_digest
    ids = calibration.calibration_chunks(model.tokenizer, 256, 1024, model.dims.vocab)[0]
    attn, mlp, _ = block_influence(model, ids, 4)
    rho = spearmanr([*attn, *mlp], [*shipped.attn, *shipped.mlp]).statistic
    assert rho > 0.8
