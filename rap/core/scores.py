"""Block importance scores: what each attention and MLP block is worth, stored as JSON.

Every method gives, per layer, one score for the attention and one for the MLP block, where
HIGHER = MORE IMPORTANT (keep it longer). With NLL the mean negative log-likelihood per predicted
calibration token (nats), so that ln(perplexity) = NLL:

    gsi        the paper's Greedy Sequential Importance (`rap.importance.search`): the whole
               removal order, the perplexity after each step, and as score the step's marginal cost
               NLL(M_k − b_k) − NLL(M_k)
    oneshot    NLL(dense − b) − NLL(dense): each block dropped alone
    bi         ShortGPT's Block Influence, 1 − E_tokens[cos(x_in, x_out)] of the block's residual
               update x_out = x_in + branch(x_in); `layers` holds it for whole layers as well
    magnitude  RMS of the block's parameters, sqrt(Σ w² / n) (no forward pass)

Scores are computed on the calibration text (`rap.importance.calibration`, C4), never on the
perplexity text or the zero-shot sets. Results are cached under `cache_dir()/scores/<model
digest>/`; the default model's scores for every method ship in `rap/data/`, so planners need no
forward pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rap.core.constants import DATA_DIR
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL_ID, cache_dir
from rap.core.masks import layer_blocks

Method = Literal["gsi", "oneshot", "bi", "magnitude"]
METHODS: tuple[str, ...] = ("gsi", "oneshot", "bi", "magnitude")
FORMAT: Literal["rap-block-scores/1"] = "rap-block-scores/1"


class TextInfo(BaseModel):
    """Which text a score or a perplexity came from: enough to reproduce and to key a cache."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    half: Literal["a", "b"] | None = None
    text_sha256: str
    seq_len: int
    chunks: int
    tokens: int
    stride: int = Field(description="Tokens between chunk starts (evenly spaced sampling).")

    @property
    def key(self) -> str:
        half = f"-{self.half}" if self.half else ""
        return f"{self.source}{half}-{self.text_sha256[:12]}-{self.tokens}x{self.seq_len}-spread"


class ScoresError(RapError):
    """Block scores that are missing, malformed, or for another model."""


class Removal(BaseModel):
    """One GSI step: the block dropped and the calibration perplexity once it is gone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["attn", "mlp"]
    layer: int = Field(ge=0)
    ppl: float


class BlockScores(BaseModel):
    """Per-block importance of one model by one method (validated wherever it is loaded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["rap-block-scores/1"] = FORMAT
    model: str = Field(description="Model identity (`PrunableModel.model_id`).")
    model_digest: str = Field(description="SHA-256 of the model's safetensors files.")
    method: Method
    num_layers: int = Field(ge=1)
    dtype: str = Field(description="dtype the forward passes ran in.")
    calibration: TextInfo | None = Field(description="Text the scores came from (None: weights).")
    attn: tuple[float, ...] = Field(description="Per layer; higher = more important.")
    mlp: tuple[float, ...] = Field(description="Per layer; higher = more important.")
    unit: str = Field(description="What a score measures.")
    layers: tuple[float, ...] | None = Field(None, description="bi: whole-layer BI (ShortGPT).")
    dense_ppl: float | None = Field(None, description="Calibration perplexity, dense model.")
    order: tuple[Removal, ...] | None = Field(None, description="gsi: the removal order.")
    details: dict[str, Any] = Field(default_factory=dict, description="Settings and timings.")

    @model_validator(mode="after")
    def _consistent(self) -> BlockScores:
        n = self.num_layers
        if len(self.attn) != n or len(self.mlp) != n:
            raise ValueError(f"attn/mlp have {len(self.attn)}/{len(self.mlp)} scores, not {n}")
        if not all(math.isfinite(x) for x in (*self.attn, *self.mlp)):
            raise ValueError("scores must be finite numbers")
        if self.layers is not None and len(self.layers) != n:
            raise ValueError(f"layers has {len(self.layers)} scores, not {n}")
        if self.method == "gsi":
            blocks = sorted((r.kind, r.layer) for r in self.order or ())
            every = sorted(layer_blocks(n))
            if blocks != every:
                raise ValueError("a gsi order must name every block exactly once")
        return self

    def score(self, kind: str, layer: int) -> float:
        return (self.attn if kind == "attn" else self.mlp)[layer]

    def costs(self) -> dict[tuple[str, int], float]:
        """What dropping each block costs, ≥ 0, for planners that weigh cost against bytes.

        Scores without an order: max(score, 0). GSI: the running maximum of its marginal costs
        along the removal order. A marginal cost measured late on GSI's path is taken on a
        model already missing most blocks (perplexity in the thousands) and can be negative
        there (the default model's attn18 at step 37: −0.22 nats); read alone it would make a
        planner drop that block first from a dense model. GSI's order says a block it keeps
        longer is worth at least what the blocks it dropped earlier cost, so the cost never
        falls along the order.
        """
        if self.order is None:
            return {(k, i): max(self.score(k, i), 0.0) for k, i in self.removal_order()}
        out: dict[tuple[str, int], float] = {}
        running = 0.0
        for kind, layer in self.removal_order():
            running = max(running, self.score(kind, layer))
            out[(kind, layer)] = running
        return out

    def removal_order(self) -> list[tuple[str, int]]:
        """Blocks least important first: GSI's own order, else ascending score (stable)."""
        if self.order is not None:
            return [(r.kind, r.layer) for r in self.order]
        blocks = layer_blocks(self.num_layers)
        return sorted(blocks, key=lambda b: self.score(*b))

    def check_for(self, model_id: str, num_layers: int) -> None:
        if self.model != model_id or self.num_layers != num_layers:
            raise ScoresError(
                f"{self.method} scores are for {self.model} ({self.num_layers} layers)",
                expected=f"scores for {model_id} ({num_layers} layers)",
                fix=f"run `rap importance --model {model_id} --method {self.method}`",
            )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1)

    @classmethod
    def from_file(cls, path: str | Path) -> BlockScores:
        p = Path(path)
        try:
            return cls.model_validate_json(p.read_text())
        except FileNotFoundError:
            raise ScoresError(f"score file {p} does not exist") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "file"
            raise ScoresError(
                f"{p} is not a valid block-score file ({where}: {first['msg']})",
                expected=f"JSON in the {FORMAT} format written by `rap importance`",
            ) from None


# -- where scores live ------------------------------------------------------------------------
def folder_digest(folder: Path) -> str:
    """SHA-256 over the names and bytes of a model folder's safetensors files (~2 s per GB)."""
    files = sorted(folder.glob("*.safetensors"))
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest(str(folder.resolve()), stamp)


@functools.lru_cache(maxsize=16)
def _digest(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in stamp:
        h.update(name.encode())
        with open(Path(folder) / name, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def cache_path(digest: str, method: str, key: str) -> Path:
    """cache_dir()/scores/<digest[:16]>/<method>-<text and settings key>.json"""
    return cache_dir() / "scores" / digest[:16] / f"{method}-{key}.json"


def shipped_path(model_id: str, method: str) -> Path:
    return DATA_DIR / f"{model_id}.{method}.json"


@functools.lru_cache(maxsize=16)
def load_default_scores(method: str) -> BlockScores:
    """The default model's scores for `method`, shipped with the package (cached in memory)."""
    return load_shipped(DEFAULT_MODEL_ID, method)


def load_shipped(model_id: str, method: str) -> BlockScores:
    if method not in METHODS:
        raise ScoresError(f"unknown scoring method {method!r}", expected=f"one of {METHODS}")
    path = shipped_path(model_id, method)
    if not path.is_file():
        raise ScoresError(
            f"no {method} scores ship for {model_id}",
            fix=f"run `rap importance --model MODEL --method {method}` and pass its JSON",
        )
    return BlockScores.from_file(path)


def find_scores(model_id: str, method: str) -> BlockScores:
    """Shipped scores for the default model, else the cached result with the most tokens."""
    if model_id == DEFAULT_MODEL_ID and shipped_path(model_id, method).is_file():
        return load_default_scores(method)
    found = []
    for path in (cache_dir() / "scores").glob(f"*/{method}-*.json"):
        if path.name.endswith(".partial.json"):  # a GSI run still going (or interrupted)
            continue
        scores = BlockScores.from_file(path)
        if scores.model == model_id:
            found.append(scores)
    if not found:
        raise ScoresError(
            f"no {method} scores for model {model_id!r} in the package or {cache_dir()}/scores",
            fix=f"run `rap importance --model {model_id} --method {method}` first",
        )
    return max(found, key=lambda s: s.calibration.tokens if s.calibration else 0)
