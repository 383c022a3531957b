from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import ARCHS, save_tiny

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model folder per architecture, shared by the whole session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHS}


def pytest_report_header() -> str:
    import transformers

    return f"rap: torch {torch.__version__}, transformers {transformers.__version__}"
