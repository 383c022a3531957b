"""Keep-masks: which attention and MLP blocks a model runs with (docs/architecture.md).

A mask is `{model, version, source, attn: [bool]*L, mlp: [bool]*L}`. `True` means kept. `version`
is (controller epoch, sequence) and orders masks from one controller; `source` says who chose it.
Masks are validated where they are built (shape, types) and where they are used (`check_for`:
the right model and number of layers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rap.core.errors import MaskError

Block = tuple[str, int]
"""One block: (kind, layer) with kind "attn" or "mlp"."""

MaskSource = Literal[
    "controller:rap",
    "controller:rap-fallback",
    "controller:heuristic",
    "controller:search",
    "local",
    "user",
]
"""Who chose a mask. The controller's masks name the planner that made them: the trained RAP
policy (`controller:rap`), mem-greedy standing in where the policy stopped over budget
(`controller:rap-fallback`), the heuristic planner (`controller:heuristic`), or search on the
perplexity surrogate (`controller:search`, `rap.planning.search`). `local`: a replica's own
fallback; `user`: an operator or a command line."""


class MaskVersion(BaseModel):
    """Orders masks: a restarted controller takes an epoch above any it finds in telemetry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epoch: int = Field(0, ge=0, description="Controller incarnation; grows on every restart.")
    seq: int = Field(0, ge=0, description="Sequence number of the mask within its epoch.")

    def __lt__(self, other: MaskVersion) -> bool:  # type: ignore[override]
        return (self.epoch, self.seq) < (other.epoch, other.seq)

    def __str__(self) -> str:
        return f"{self.epoch}.{self.seq}"


class KeepMask(BaseModel):
    """Which blocks a model keeps: `attn[i]` / `mlp[i]` is True when layer i's block runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        description="Identity of the model the mask is for (`PrunableModel.model_id`)."
    )
    version: MaskVersion = Field(default_factory=MaskVersion, description="(epoch, seq) ordering.")
    source: MaskSource = Field(
        "user", description="Who chose it (`MaskSource`): controller:<planner>, local, user."
    )
    attn: tuple[bool, ...] = Field(description="Per layer: is the attention block kept?")
    mlp: tuple[bool, ...] = Field(description="Per layer: is the MLP block kept?")

    @model_validator(mode="after")
    def _same_length(self) -> KeepMask:
        if len(self.attn) != len(self.mlp):
            raise ValueError(
                f"attn has {len(self.attn)} entries and mlp {len(self.mlp)}; they must be equal"
            )
        if not self.attn:
            raise ValueError("a mask needs at least one layer")
        return self

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def dense(cls, model: str, num_layers: int, **kw: object) -> KeepMask:
        """The mask that keeps every block."""
        return cls(model=model, attn=(True,) * num_layers, mlp=(True,) * num_layers, **kw)  # type: ignore[arg-type]

    @classmethod
    def from_drops(
        cls, model: str, num_layers: int, drop_attn: str = "", drop_mlp: str = ""
    ) -> KeepMask:
        """A mask from drop lists like `"3,5-9"` (layer indices, ranges inclusive)."""
        attn_drop = parse_layer_list(drop_attn, num_layers, "--drop-attn")
        mlp_drop = parse_layer_list(drop_mlp, num_layers, "--drop-mlp")
        return cls(
            model=model,
            attn=tuple(i not in attn_drop for i in range(num_layers)),
            mlp=tuple(i not in mlp_drop for i in range(num_layers)),
        )

    @classmethod
    def from_json(cls, text: str, origin: str = "mask JSON") -> KeepMask:
        """Parse and validate a mask; any problem becomes one `MaskError` line."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "mask"
            raise MaskError(
                f"{origin} is not a valid keep-mask ({where}: {first['msg']})",
                expected='{"model": str, "attn": [bool]*L, "mlp": [bool]*L}',
            ) from None

    @classmethod
    def from_file(cls, path: str | Path) -> KeepMask:
        p = Path(path)
        if not p.is_file():
            raise MaskError(f"mask file {p} does not exist", fix="pass a path to a mask JSON file")
        return cls.from_json(p.read_text(), origin=f"mask file {p}")

    # -- checks and views -----------------------------------------------------------------
    def check_for(self, model_id: str, num_layers: int) -> None:
        """Raise `MaskError` unless this mask fits a model with this identity and depth."""
        if self.model != model_id:
            raise MaskError(
                f"mask is for model {self.model!r}", expected=f"a mask for {model_id!r}"
            )
        if len(self.attn) != num_layers:
            raise MaskError(
                f"mask has {len(self.attn)} layers", expected=f"{num_layers} (the model's layers)"
            )

    @property
    def from_controller(self) -> bool:
        return self.source.startswith("controller:")

    @property
    def num_layers(self) -> int:
        return len(self.attn)

    @property
    def kept_fraction(self) -> float:
        """Share of all 2·L blocks kept (not of bytes)."""
        return (sum(self.attn) + sum(self.mlp)) / (2 * self.num_layers)

    @property
    def dropped_attn(self) -> list[int]:
        return [i for i, k in enumerate(self.attn) if not k]

    @property
    def dropped_mlp(self) -> list[int]:
        return [i for i, k in enumerate(self.mlp) if not k]

    @property
    def key(self) -> str:
        """The dropped blocks as a key, `"a3,m10"` (`key_of`); the dense mask's is `""`."""
        return key_of(self.attn, self.mlp)

    @classmethod
    def from_key(cls, model: str, num_layers: int, key: str) -> KeepMask:
        attn, mlp = keep_of(key, num_layers)
        return cls(model=model, attn=attn, mlp=mlp)

    def without(self, *blocks: Block) -> KeepMask:
        """This mask with `blocks` dropped as well."""
        attn, mlp = list(self.attn), list(self.mlp)
        for kind, layer in blocks:
            (attn if kind == "attn" else mlp)[layer] = False
        return self.model_copy(update={"attn": tuple(attn), "mlp": tuple(mlp)})

    def within(self, ceiling: KeepMask) -> KeepMask:
        """This mask with every block `ceiling` drops dropped as well (an operator's pushed mask
        caps what any plan may keep); labelled `user` when the ceiling removed something."""
        extra = [b for b in layer_blocks(self.num_layers) if self.keeps(b) and not ceiling.keeps(b)]
        return self.without(*extra).model_copy(update={"source": "user"}) if extra else self

    def kept_blocks(self) -> list[Block]:
        """Blocks this mask keeps, attention before MLP within a layer, layers in order."""
        return [b for b in layer_blocks(self.num_layers) if self.keeps(b)]

    def keeps(self, block: Block) -> bool:
        kind, layer = block
        return (self.attn if kind == "attn" else self.mlp)[layer]

    def kept_vector(self) -> list[float]:
        """1.0 per kept block in vector order: attention 0..L−1, then MLP 0..L−1 (the agent's
        and the surrogate's numbering, j = 0..2L−1)."""
        return [float(k) for k in (*self.attn, *self.mlp)]

    @classmethod
    def from_vector(cls, model: str, kept: Sequence[float], **kw: object) -> KeepMask:
        """The mask of a kept vector in vector order (`kept_vector`)."""
        half = len(kept) // 2
        return cls(
            model=model,
            attn=tuple(bool(k) for k in kept[:half]),
            mlp=tuple(bool(k) for k in kept[half:]),
            **kw,
        )  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        """Short tag for responses: version and fraction of blocks kept."""
        return f"rap-{self.version}-{self.source}-keep{self.kept_fraction:.3f}"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"))


def layer_blocks(num_layers: int) -> list[Block]:
    """Every block, layer by layer: attn 0, mlp 0, attn 1, ... (planners break ties in this
    order, so it is part of what a plan is)."""
    return [(k, i) for i in range(num_layers) for k in ("attn", "mlp")]


def max_drops(num_blocks: int, min_kept_fraction: float) -> int:
    """Most blocks the quality floor lets a mask drop: N − ⌈floor · N⌉ of its N = 2L blocks."""
    return num_blocks - math.ceil(min_kept_fraction * num_blocks - 1e-9)


def key_of(attn: Sequence[bool], mlp: Sequence[bool]) -> str:
    """Dropped blocks as a sorted key: attention first, layers ascending (`"a3,m10"`)."""
    parts = [f"a{i}" for i, k in enumerate(attn) if not k]
    parts += [f"m{i}" for i, k in enumerate(mlp) if not k]
    return ",".join(parts)


def blocks_of(key: str) -> list[Block]:
    """`"a3,m10"` → [("attn", 3), ("mlp", 10)]."""
    return [("attn" if p[0] == "a" else "mlp", int(p[1:])) for p in key.split(",") if p]


def keep_of(key: str, num_layers: int) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """The (attn, mlp) keep vectors of a key."""
    attn, mlp = [True] * num_layers, [True] * num_layers
    for kind, layer in blocks_of(key):
        (attn if kind == "attn" else mlp)[layer] = False
    return tuple(attn), tuple(mlp)


def key_for(blocks: Iterable[Block]) -> str:
    """The key of a drop set given as blocks."""
    drop = set(blocks)
    n = 1 + max((i for _, i in drop), default=0)
    return key_of(
        [("attn", i) not in drop for i in range(n)], [("mlp", i) not in drop for i in range(n)]
    )


def parse_layer_list(text: str, num_layers: int, flag: str = "layers") -> set[int]:
    """`"3,5-9"` → {3, 5, 6, 7, 8, 9}; every index must lie in [0, num_layers)."""
    out: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        lo_s, sep, hi_s = item.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise MaskError(
                f"{flag}: {item!r} is not a layer index or range",
                expected="comma-separated indices and ranges such as 3,5-9",
            ) from None
        if lo > hi:
            raise MaskError(f"{flag}: range {item!r} runs backwards", expected="low-high")
        if lo < 0 or hi >= num_layers:
            raise MaskError(
                f"{flag}: layer {hi if hi >= num_layers else lo} is out of range",
                expected=f"indices in 0..{num_layers - 1}",
            )
        out.update(range(lo, hi + 1))
    return out
