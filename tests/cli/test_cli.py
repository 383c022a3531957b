"""The command line: `rap info`, `rap generate`, and one clear line with exit 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rap.cli.main import main
from rap.core import memory
from tests.tiny import tiny_config


def test_info_json_on_a_tiny_model(tiny_dirs, capsys) -> None:
    assert main(["info", "--model", str(tiny_dirs["qwen2"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = tiny_config("qwen2")
    assert info["num_layers"] == 4
    assert info["attn_block_bytes"] == memory.block_bytes(cfg, "attn", "float16")
    assert info["mlp_block_bytes"] == memory.block_bytes(cfg, "mlp", "float16")
    assert info["kv_bytes_per_token_per_layer"] == 2 * 2 * 16 * 2


def test_generate_needs_a_tokenizer_for_text(tiny_dirs, capsys) -> None:
    assert main(["generate", "--model", str(tiny_dirs["llama"]), "--prompt", "hi"]) == 2
    assert "tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["generate", "--prompt", "x", "--drop-attn", "3,99"], "layer 99 is out of range"),
        (["generate", "--prompt", "x", "--drop-mlp", "2-x"], "not a layer index or range"),
        (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens 0 is too small"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tiny_dirs, capsys) -> None:
    args = [a if a != "MODEL" else str(tiny_dirs["llama"]) for a in args]
    if args[0] == "generate":
        args += ["--model", str(tiny_dirs["llama"])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_mask_file_errors(tiny_dirs, tmp_path, capsys) -> None:
    model = str(tiny_dirs["llama"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": ')
    wrong_len = tmp_path / "len.json"
    wrong_len.write_text(json.dumps({"model": "llama", "attn": [True] * 3, "mlp": [True] * 3}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "gpt-x", "attn": [True] * 4, "mlp": [True] * 4}))
    for path, message in (
        (bad, "not a valid keep-mask"),
        (wrong_len, "mask has 3 layers"),
        (other, "mask is for model 'gpt-x'"),
    ):
        assert main(["generate", "--model", model, "--prompt", "x", "--mask", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_folder_without_weights(tmp_path, capsys) -> None:
    tiny_config("llama").save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == 2
    assert "holds no weights" in capsys.readouterr().err


def test_entry_point_exit_status(tmp_path) -> None:
    """The installed script path: a bad model gives status 2 and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "rap.cli", "info", "--model", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
