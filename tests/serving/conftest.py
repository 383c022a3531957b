"""Fixtures shared by the serving tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import ARCHS, save_tiny, save_tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models of every architecture, with a word-level tokenizer."""
    out = {}
    for arch in ARCHS:
        folder = save_tiny(arch, tmp_path_factory.mktemp(arch))
        save_tokenizer(folder)
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("served")
    save_tiny("llama", folder)
    save_tokenizer(folder)
    return folder
