"""Units, dtype names and where the package's data lives: one definition each."""

from __future__ import annotations

from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB
STEP_TOKENS = 256
"""Tokens one engine step runs at most (`EngineConfig.max_step_tokens`' default): prompts are
fed in chunks of it, so a step's activations, not a whole prompt's, are what a mask must leave
room for (`rap.core.memory.step_bytes`)."""
DTYPES = ("float32", "float16", "bfloat16")
"""Serving dtypes a user may name (`--dtype`, `ServeAppConfig.dtype`)."""
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
"""`rap/data`: the default model's block scores, perplexity table, surrogate and policy."""
