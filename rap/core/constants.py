"""Units, dtype names and where the package's data lives: one definition each."""

from __future__ import annotations

from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB
DTYPES = ("float32", "float16", "bfloat16")
"""Serving dtypes a user may name (`--dtype`, `ServeAppConfig.dtype`)."""
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
"""`rap/data`: the default model's block scores, perplexity table, surrogate and policy."""
