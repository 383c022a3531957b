from __future__ import annotations

import pytest

from rap.core.errors import MaskError
from rap.core.masks import (
    KeepMask,
    MaskVersion,
    blocks_of,
    keep_of,
    key_for,
    key_of,
    parse_layer_list,
)


def test_parse_layer_list() -> None:
    assert parse_layer_list("3,5-9", 30) == {3, 5, 6, 7, 8, 9}
    assert parse_layer_list(" ", 30) == set()
    for bad, msg in (
        ("30", "out of range"),
        ("9-5", "backwards"),
        ("a", "not a layer"),
        ("-1", "not a layer"),
    ):
        with pytest.raises(MaskError, match=msg):
            parse_layer_list(bad, 30)


def test_from_drops_and_views() -> None:
    m = KeepMask.from_drops("m", 4, drop_attn="0", drop_mlp="2-3")
    assert m.attn == (False, True, True, True) and m.mlp == (True, True, False, False)
    assert m.dropped_attn == [0] and m.dropped_mlp == [2, 3]
    assert m.kept_fraction == pytest.approx(5 / 8)
    assert m.fingerprint().startswith("rap-0.0-user-keep0.625")


def test_json_round_trip_and_errors(tmp_path) -> None:
    m = KeepMask.from_drops("m", 3, drop_attn="1")
    assert KeepMask.from_json(m.to_json()) == m
    for text, msg in (
        ('{"model": "m"', "not a valid keep-mask"),
        ('{"model": "m", "attn": [true], "mlp": [true, true]}', "must be equal"),
        ('{"model": "m", "attn": [], "mlp": []}', "at least one layer"),
        ('{"model": "m", "attn": ["x"], "mlp": [true]}', "attn"),
        ('{"model": "m", "attn": [true], "mlp": [true], "extra": 1}', "extra"),
    ):
        with pytest.raises(MaskError, match=msg):
            KeepMask.from_json(text)
    with pytest.raises(MaskError, match="does not exist"):
        KeepMask.from_file(tmp_path / "none.json")


def test_check_for_and_versions() -> None:
    m = KeepMask.dense("m", 3)
    m.check_for("m", 3)
    with pytest.raises(MaskError, match="expected a mask for 'n'"):
        m.check_for("n", 3)
    with pytest.raises(MaskError, match="expected 4"):
        m.check_for("m", 4)
    assert MaskVersion(epoch=1, seq=0) > MaskVersion(epoch=0, seq=9)
    assert MaskVersion(epoch=2, seq=1) < MaskVersion(epoch=2, seq=3)


def test_mask_keys_round_trip() -> None:
    attn, mlp = (True, False, True), (False, True, True)
    key = key_of(attn, mlp)
    assert key == "a1,m0"
    assert keep_of(key, 3) == (attn, mlp)
    assert blocks_of(key) == [("attn", 1), ("mlp", 0)]
    assert key_for([("mlp", 0), ("attn", 1)]) == key
    assert key_of((True,) * 3, (True,) * 3) == ""
    mask = KeepMask(model="m", attn=attn, mlp=mlp)
    assert mask.key == key and KeepMask.from_key("m", 3, key) == mask
    assert mask.without(("attn", 0)).key == "a0,a1,m0"
    assert KeepMask.from_vector("m", mask.kept_vector()) == mask
