"""`rap eval --text FILE`: a user's file in BOS windows, perplexity alone with `--tasks none`,
and one clear line for a file it cannot use."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rap.cli.main import main
from rap.core.loading import load_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # 540 bytes: 540 byte tokens


def _eval(model: str, text: str, out: str, seq_len: int = 64) -> list[str]:
    return [
        *("eval", "--model", model, "--methods", "random", "--budgets", "1.0"),
        *("--tasks", "none", "--text", text, "--ppl-seq-len", str(seq_len)),
        *("--ppl-tokens", "256", "--batch", "2", "--seq", "64", "--out", out),
    ]


def test_eval_text_measures_bos_windows_of_the_file(tiny_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "mine.txt"
    path.write_text(TEXT, encoding="utf-8")
    model = str(tiny_dirs["llama"])
    assert main(_eval(model, str(path), str(tmp_path / "out"))) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["tasks"] == {} and result["rows"][0]["tasks"] == {}
    text = result["perplexity_text"]
    assert text["bos"] and text["chunks"] == 4 and text["stride"] == 63  # 256 // 64 windows
    # The same windows scored independently: BOS, then the next 63 byte tokens, no overlap.
    m = load_model(model)
    ids = [b % m.dims.vocab for b in TEXT.encode()]
    rows = torch.tensor([[1, *ids[i * 63 : (i + 1) * 63]] for i in range(4)])
    with torch.inference_mode():
        logits = m.hf(input_ids=rows, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)
    )
    assert math.isclose(result["rows"][0]["ppl"], math.exp(float(nll)), rel_tol=1e-4)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "4 windows of 64 tokens (BOS + 63 tokens of the file each, stride 63)" in table
    assert "Text PPL" in table and "PIQA" not in table


def test_eval_help_states_windows_bos_and_stride(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "BOS" in help_text and "stride --ppl-seq-len − 1" in help_text
    assert "none: perplexity only" in help_text


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "is missing; expected a UTF-8 text file"),
        (b"caf\xe9 au lait", "is not UTF-8 (byte 3 is 0xe9)"),
        (b"  \n", "is empty"),
        (b"too short", "is 9 tokens, shorter than one window's 63; expected at least 63"),
    ],
)
def test_a_file_it_cannot_use_is_one_clear_line(content, message, tiny_dirs, tmp_path, capsys):
    path = tmp_path / "mine.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(_eval(str(tiny_dirs["llama"]), str(path), str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err  # a too-short file is known once the tokenizer has loaded
    assert message in err.strip().splitlines()[-1] and err.count("error:") == 1
    assert ("Loading" in err) == (content == b"too short")  # the others fail before it loads
    assert not (tmp_path / "out").exists()
