"""Computing block scores (`rap importance`): magnitude, Block Influence, one-shot and GSI.

See `rap.core.scores` for what each score means and `rap.importance.search` for the perplexity
searches.
`get_scores` is the entry point: it answers from the scores shipped with the package, or from
the cache, when the same model (by digest), dtype, calibration text, method, tokens and settings
were scored before, else computes and caches.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rap.core.errors import RapError
from rap.core.model import PrunableModel
from rap.core.scores import (
    METHODS,
    BlockScores,
    Removal,
    cache_path,
    folder_digest,
    shipped_path,
)
from rap.importance.calibration import Half, TextInfo, calibration_chunks
from rap.importance.nll import NllEvaluator
from rap.importance.search import OneShot, gsi, one_shot

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ScoreSettings:
    """What a score depends on besides the model: text, tokens and the GSI race's settings."""

    method: str
    tokens: int = 8192
    seq_len: int = 512
    batch_size: int = 4
    half: Half = None
    screen_batches: int = 1
    finalists: int = 4

    def key(self, text: TextInfo | None) -> str:
        if text is None:
            return "weights"
        race = f"-screen{self.screen_batches}x{self.batch_size}-top{self.finalists}"
        return text.key + (race if self.method == "gsi" else "")


def model_digest(model: PrunableModel) -> str:
    """Digest of the model's safetensors files (the weights its scores belong to)."""
    source = model.store.source
    if source is None:
        raise RapError(
            f"model {model.model_id} has no readable safetensors files to identify it by",
            fix="load the model from a folder saved with save_pretrained",
        )
    return folder_digest(source.folder)


def magnitude(model: PrunableModel) -> tuple[list[float], list[float]]:
    """sqrt(Σ w² / n) over each block's parameters (norms included), per layer."""
    out: dict[str, list[float]] = {"attn": [], "mlp": []}
    for kind in ("attn", "mlp"):
        for layer in range(model.num_layers):
            buf = model.store.slots[(kind, layer)].buffer
            assert buf is not None, "magnitude needs the dense model"
            out[kind].append(float(buf.float().pow(2).mean().sqrt()))
    return out["attn"], out["mlp"]


def _branch_module(model: PrunableModel, layer: int, kind: str) -> torch.nn.Module:
    """The module whose output is the block's residual update: its post-norm when it has one
    (Gemma: parts = pre-norm, post-norm, branch), else the branch itself."""
    parts = model.spec.block_parts(kind)
    module = model.spec.layers(model.hf)[layer]
    return getattr(module, parts[1] if len(parts) == 3 else parts[-1])


def block_influence(
    model: PrunableModel, ids: torch.Tensor, batch_size: int
) -> tuple[list[float], list[float], list[float]]:
    """BI = 1 − mean_tokens cos(x_in, x_out) for attention blocks, MLP blocks and whole layers.

    x_in is the stream entering the layer (pre-hook), the attention block's update u_a and the
    MLP's u_m come from forward hooks: attention maps x_in → x_mid = x_in + u_a, the MLP maps
    x_mid → x_out = x_mid + u_m, and the layer x_in → x_out.
    """
    model.apply(model.dense_mask())
    n = model.num_layers
    sums = {k: [0.0] * n for k in ("attn", "mlp", "layer")}
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).sum())

    def make_hooks(layer: int) -> None:
        def pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["in"] = args[0] if args else kwargs["hidden_states"]

        def attn(_m: Any, _a: Any, out: Any) -> None:
            seen["mid"] = seen["in"] + (out[0] if isinstance(out, tuple) else out)
            sums["attn"][layer] += cos(seen["in"], seen["mid"])

        def mlp(_m: Any, _a: Any, out: Any) -> None:
            x_out = seen["mid"] + (out[0] if isinstance(out, tuple) else out)
            sums["mlp"][layer] += cos(seen["mid"], x_out)
            sums["layer"][layer] += cos(seen["in"], x_out)

        mod = model.spec.layers(model.hf)[layer]
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(_branch_module(model, layer, "attn").register_forward_hook(attn))
        handles.append(_branch_module(model, layer, "mlp").register_forward_hook(mlp))

    for layer in range(n):
        make_hooks(layer)
    try:
        with torch.inference_mode():
            for batch in ids.to(model.device).split(batch_size):
                model.hf(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    count = ids.numel()
    attn, mlp, lay = ([1.0 - s / count for s in sums[k]] for k in ("attn", "mlp", "layer"))
    return attn, mlp, lay


def compute_scores(
    model: PrunableModel,
    settings: ScoreSettings,
    progress: Progress | None = None,
    digest: str | None = None,
) -> BlockScores:
    """Score every block of `model` by `settings.method` (see `rap.core.scores`)."""
    if settings.method not in METHODS:
        raise RapError(f"unknown scoring method {settings.method!r}", expected=f"one of {METHODS}")
    t0 = time.perf_counter()
    base: dict[str, Any] = {
        "model": model.model_id,
        "model_digest": digest or model_digest(model),
        "method": settings.method,
        "num_layers": model.num_layers,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    details = describe_run(model)
    if settings.method == "magnitude":
        attn, mlp = magnitude(model)
        details["seconds"] = round(time.perf_counter() - t0, 3)
        return BlockScores(
            **base, calibration=None, attn=attn, mlp=mlp, unit="RMS of weights", details=details
        )
    ids, text = calibration_chunks(
        model.tokenizer, settings.seq_len, settings.tokens, model.dims.vocab, settings.half
    )
    if settings.method == "bi":
        attn, mlp, layers = block_influence(model, ids, settings.batch_size)
        details["seconds"] = round(time.perf_counter() - t0, 3)
        return BlockScores(
            **base,
            calibration=text,
            attn=attn,
            mlp=mlp,
            layers=layers,
            details=details,
            unit="1 - mean cosine(block input, block output)",
        )
    return _measured(model, settings, ids, text, base, details, progress)


def _measured(
    model: PrunableModel,
    settings: ScoreSettings,
    ids: torch.Tensor,
    text: TextInfo,
    base: dict[str, Any],
    details: dict[str, Any],
    progress: Progress | None,
) -> BlockScores:
    """oneshot and gsi: scores from measured calibration NLL (mean nats per predicted token)."""
    ev = NllEvaluator(model, ids, settings.batch_size)
    per_token = 1.0 / ev.predicted
    n = model.num_layers
    scores = {"attn": [0.0] * n, "mlp": [0.0] * n}
    t0 = time.perf_counter()
    if settings.method == "oneshot":
        shot = one_shot(ev, progress)
        for (kind, layer), nll in shot.nll.items():
            scores[kind][layer] = (nll - shot.dense_nll) * per_token
        dense_nll, order = shot.dense_nll, None
        details["chunk_nll"] = {f"{k}{i}": v for (k, i), v in shot.chunk_nll.items()}
        details["dense_chunk_nll"] = shot.dense_chunk_nll
    else:
        order = _run_gsi(settings, ev, text, base["model_digest"], details, progress, scores)
        dense_nll = details.pop("dense_nll")
    details["runs"] = ev.runs
    details["full_evaluation_equivalents"] = round(ev.full_equivalents(), 2)
    details["seconds"] = round(time.perf_counter() - t0, 1)
    return BlockScores(
        **base,
        calibration=text,
        attn=scores["attn"],
        mlp=scores["mlp"],
        unit="increase of mean NLL per token (nats) when the block is dropped",
        dense_ppl=math.exp(dense_nll * per_token),
        order=order,
        details=details,
    )


def _run_gsi(
    settings: ScoreSettings,
    ev: NllEvaluator,
    text: TextInfo,
    digest: str,
    details: dict[str, Any],
    progress: Progress | None,
    scores: dict[str, list[float]],
) -> list[Removal]:
    """GSI with checkpoints; fills `scores` with marginal costs and `details` with settings."""
    first = _cached_one_shot(digest, text, ev.predicted)
    details["first_step_from_oneshot"] = first is not None
    partial = cache_path(digest, "gsi", settings.key(text) + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    res = gsi(ev, settings.screen_batches, settings.finalists, first, progress, partial)
    prev = res.dense_nll
    for step in res.steps:
        scores[step.kind][step.layer] = (step.nll - prev) / ev.predicted
        prev = step.nll
    details["dense_nll"] = res.dense_nll
    details["screen_tokens"] = settings.screen_batches * settings.batch_size * settings.seq_len
    details["finalists"] = settings.finalists
    details["exact"] = settings.screen_batches == 0
    details["gsi_seconds_all_sessions"] = round(res.seconds, 1)
    partial.unlink(missing_ok=True)
    return [
        Removal(kind=s.kind, layer=s.layer, ppl=ev.perplexity(s.nll))  # type: ignore[arg-type]
        for s in res.steps
    ]


def _cached_one_shot(digest: str, text: TextInfo, predicted: int) -> OneShot | None:
    """A cached one-shot scan on the same text is GSI's first step, exactly: reuse it."""
    path = cache_path(digest, "oneshot", text.key)
    if not path.is_file():
        return None
    shot = BlockScores.from_file(path)
    assert shot.dense_ppl is not None
    dense = math.log(shot.dense_ppl) * predicted
    nll = {
        (k, i): dense + shot.score(k, i) * predicted
        for k in ("attn", "mlp")
        for i in range(shot.num_layers)
    }
    return OneShot(dense, nll, {}, [], 0.0)


def shipped_match(
    model: PrunableModel, settings: ScoreSettings, text: TextInfo | None, digest: str
) -> BlockScores | None:
    """The package's shipped scores when they answer exactly this question: the same weights
    (digest), dtype, method, calibration text and tokens, and for GSI the same race."""
    path = shipped_path(model.model_id, settings.method)
    if not path.is_file():
        return None
    shipped = BlockScores.from_file(path)
    same_text = (shipped.calibration.key if shipped.calibration else None) == (
        text.key if text else None
    )
    same_run = (
        shipped.model_digest == digest
        and shipped.dtype == str(model.dtype).removeprefix("torch.")
        and same_text
    )
    if settings.method == "gsi":
        d = shipped.details
        race = (d.get("screen_tokens"), d.get("finalists"), d.get("exact"))
        same_run = same_run and race == (
            settings.screen_batches * settings.batch_size * settings.seq_len,
            settings.finalists,
            settings.screen_batches == 0,
        )
    return shipped if same_run else None


def get_scores(
    model: PrunableModel,
    settings: ScoreSettings,
    progress: Progress | None = None,
    refresh: bool = False,
) -> tuple[BlockScores, str]:
    """Shipped or cached scores if they answer the same question (and `refresh` is False),
    else computed and cached. Returns the scores and where they came from: "shipped",
    "cache" or "computed".
    """
    digest = model_digest(model)
    text = None
    if settings.method != "magnitude":
        _, text = calibration_chunks(
            model.tokenizer,
            settings.seq_len,
            settings.tokens,
            model.dims.vocab,
            settings.half,
        )
    path = cache_path(digest, settings.method, settings.key(text))
    if not refresh:
        shipped = shipped_match(model, settings, text, digest)
        if shipped is not None:
            return shipped, "shipped"
        if path.is_file():
            return BlockScores.from_file(path), "cache"
    scores = compute_scores(model, settings, progress, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(scores.to_json())
    tmp.replace(path)
    return scores, "computed"


def describe_run(model: Any) -> dict[str, Any]:
    """Where scores were computed, for their `details`."""
    return {
        "device": str(model.device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
