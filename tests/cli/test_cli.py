"""The command line: `rap info`, `rap generate`, and one clear line with exit 2 for bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from rap.cli import serve as serve_cli
from rap.cli.admin_token import admin_token, write_admin_token
from rap.cli.common import read_secret
from rap.cli.main import build_parser, main
from rap.core import memory
from rap.core.errors import RapError
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


# -- secrets: from the environment or a file, never a flag's value (`ps` shows flags) ---------
def _options(*words: str) -> set[str]:
    """Every option string of the subcommand `rap WORDS...`."""
    import argparse

    parser: argparse.ArgumentParser = build_parser()
    for word in words:
        [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[word]
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize(
    ("words", "gone", "kept"),
    [
        (("serve",), {"--api-key", "--admin-token"}, {"--api-key-file", "--admin-token-file"}),
        (("budget", "set"), {"--token"}, {"--token-file"}),
        (("grafana", "push"), {"--token"}, {"--token-file"}),
    ],
)
def test_no_secret_is_a_flag_value(words, gone, kept) -> None:
    options = _options(*words)
    assert not gone & options and kept <= options
    with pytest.raises(SystemExit):  # argparse rejects the old flag (no prefix match either)
        build_parser().parse_args([*words, gone.pop(), "secret"])


def test_read_secret_file_then_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAP_TEST_SECRET", "from-env")
    secret = tmp_path / "secret"
    secret.write_text("  from-file \n")
    assert read_secret(str(secret), "RAP_TEST_SECRET", "test secret") == "from-file"
    assert read_secret(None, "RAP_TEST_SECRET", "test secret") == "from-env"
    monkeypatch.setenv("RAP_TEST_SECRET", "")
    assert read_secret(None, "RAP_TEST_SECRET", "test secret") is None
    monkeypatch.delenv("RAP_TEST_SECRET")
    assert read_secret(None, "RAP_TEST_SECRET", "test secret") is None


def test_read_secret_missing_or_empty_file_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAP_TEST_SECRET", "from-env")  # a named file never falls back to it
    missing = tmp_path / "missing"
    with pytest.raises(RapError) as err:
        read_secret(str(missing), "RAP_TEST_SECRET", "test secret")
    assert f"cannot read the test secret file {missing}" in str(err.value)
    assert "set RAP_TEST_SECRET instead" in str(err.value)
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(RapError) as err:
        read_secret(str(empty), "RAP_TEST_SECRET", "test secret")
    assert f"the test secret file {empty} is empty" in str(err.value)


def test_generated_admin_token_file_is_0600(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = write_admin_token("tok-1", 8000)
    assert path == tmp_path / "cache" / "rap" / "admin-token-8000"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) & 0o077 == 0
    os.chmod(path, 0o644)  # a file left readable by others is narrowed on the next write
    assert write_admin_token("tok-2", 8000) == path and path.read_text().strip() == "tok-2"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_serve_prints_the_token_path_not_the_token(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("RAP_ADMIN_TOKEN", raising=False)
    token, (where, flag) = admin_token(None, "RAP_ADMIN_TOKEN", 8000)
    path = tmp_path / "rap" / "admin-token-8000"
    assert path.read_text().strip() == token and len(token) >= 16
    assert where == f"in {path} (readable by you only)" and flag == f" --token-file {path}"
    assert token not in where + flag
    monkeypatch.setenv("RAP_ADMIN_TOKEN", "env-token")
    token, (where, flag) = admin_token(None, "RAP_ADMIN_TOKEN", 8000)
    assert token == "env-token" and "env-token" not in where + flag


def test_budget_set_without_a_token_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAP_ADMIN_TOKEN", raising=False)
    assert main(["budget", "set", "--replica", "replica-0", "--gib", "0.4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "no admin token; set RAP_ADMIN_TOKEN or pass --token-file" in err


def test_budget_set_reads_its_token_file(tmp_path, monkeypatch, capsys) -> None:
    """The file's token, not the environment's, goes to the server."""
    seen: list[str | None] = []

    def fake_http_json(url: str, body: dict, token: str | None) -> dict:
        seen.append(token)
        return {"replica": body["replica"], "budget_bytes": int(body["gib"] * 2**30)}

    monkeypatch.setenv("RAP_ADMIN_TOKEN", "env-token")
    monkeypatch.setattr(serve_cli, "http_json", fake_http_json)
    token_file = tmp_path / "admin-token"
    token_file.write_text("file-token\n")
    args = ["budget", "set", "--replica", "r", "--gib", "1", "--token-file", str(token_file)]
    assert main(args) == 0 and seen == ["file-token"]
    assert "r: budget 1.000 GiB" in capsys.readouterr().out


# -- rap generate: what it prints is the model's output, said so, and never a screen of blanks
class _NewlinesModel:
    """A stand-in for a pruned model that answers with nothing but newlines."""

    dtype = "torch.float32"

    def weight_bytes(self) -> int:
        return 1000

    def apply(self, _mask):
        return type("Change", (), {"released_bytes": 0})()

    def encode(self, _prompt, chat: bool) -> list[int]:
        return [1, 2, 3]

    def generate_ids(self, _ids, max_tokens: int):
        return type("Result", (), {"token_ids": [[13] * max_tokens], "kv_bytes": 10})()

    def decode(self, ids) -> str:
        return "\n" * len(ids)

    def predicted_kv_bytes(self, _batch, _seq) -> int:
        return 10


def test_generate_says_what_it_prints_and_shows_blank_output(tiny_dirs, monkeypatch, capsys):
    import rap.cli.main as main_cli

    monkeypatch.setattr(main_cli, "load_model", lambda *_a, **_k: _NewlinesModel())
    args = ["generate", "--model", str(tiny_dirs["llama"]), "--prompt", "hi"]
    assert main([*args, "--max-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model output (40 tokens, --max-tokens 40):\n")
    assert "[no visible text: 40 whitespace characters, '\\n\\n" in out
    assert "\n\n" not in out  # no screen of blank lines


def test_display_text_counts_runs_of_blank_lines() -> None:
    from rap.cli.main import display_text

    assert display_text("Paris.\n\n\n\n\n\nLyon.\n\n\n") == "Paris.\n[5 blank lines]\nLyon."
    assert display_text("a\n\nb") == "a\n\nb"  # one blank line is text, shown as it is


# -- rap importance --method gsi: the defaults are the shipped recipe; else it says it computes
def _importance_settings(argv: list[str]):
    from rap.cli.importance import settings_from_args

    return settings_from_args(build_parser().parse_args(argv))


def _answered_by_shipped(settings) -> bool:
    """What the shipped GSI file answers, by get_scores' own test (the default model, float32,
    the shipped text: what a user's run of the same flags has)."""
    from types import SimpleNamespace

    import torch

    from rap.core.scores import load_default_scores
    from rap.importance.scorers import shipped_match

    shipped = load_default_scores(settings.method)
    text = shipped.calibration
    assert text is not None
    if (settings.tokens, settings.seq_len, settings.half) != (text.tokens, text.seq_len, text.half):
        return False
    model = SimpleNamespace(model_id=shipped.model, dtype=torch.float32)
    return shipped_match(model, settings, text, shipped.model_digest) is not None


def test_gsi_with_no_other_flag_is_the_shipped_recipe() -> None:
    assert _answered_by_shipped(_importance_settings(["importance", "--method", "gsi"]))
    other = ["importance", "--method", "gsi", "--finalists", "4"]
    assert not _answered_by_shipped(_importance_settings(other))  # the test can tell


def test_the_notice_names_a_command_the_shipped_scores_answer() -> None:
    import shlex

    from rap.cli.importance_notice import compute_notice
    from rap.core.loading import DEFAULT_MODEL_ID

    settings = _importance_settings(["importance", "--method", "gsi", "--batch-size", "4"])
    notice = compute_notice(DEFAULT_MODEL_ID, 30, settings)
    first, second = notice.splitlines()
    assert "computing them, roughly " in first and " h " in first  # hours, at these settings
    command = second.split("answer at once: ")[1]
    assert command.startswith("rap importance --method gsi ")
    assert _answered_by_shipped(_importance_settings(shlex.split(command)[1:]))
    shipped = compute_notice(DEFAULT_MODEL_ID, 30, _importance_settings(shlex.split(command)[1:]))
    assert "roughly 54 min" in shipped  # the shipped run's own time, all its sessions


def test_importance_says_it_computes_before_it_does(tiny_dirs, tmp_path, monkeypatch, capsys):
    import rap.importance.scorers

    def stop(*_a, **_k):
        raise RapError("stopped where the computation starts")

    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path))
    args = ["importance", "--model", str(tiny_dirs["mistral"]), "--tokens", "256", "--seq-len"]
    monkeypatch.setattr(rap.importance.scorers, "compute_scores", stop)
    assert main([*args, "32", "--method", "gsi"]) == 2
    err = capsys.readouterr().err
    assert err.index("no shipped or cached gsi scores") < err.index("stopped where")
    assert "computing them, roughly " in err and "answer at once" not in err  # none ship
    monkeypatch.undo()
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path))
    assert main([*args, "32", "--method", "oneshot", "--json"]) == 0
    assert "computing them" in capsys.readouterr().err
    assert main([*args, "32", "--method", "oneshot", "--json"]) == 0  # cached now: no notice
    assert "computing" not in capsys.readouterr().err
