from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import ARCHS, save_tiny

torch.set_num_threads(2)

SLOW_TIMEOUT_S = 900
"""Per-test limit (pytest-timeout) of slow-marked tests when the command line sets none:
pyproject's `timeout` is the fast tier's, and scripts/test.sh passes each tier's own."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("timeout", None) is not None:
        return
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model folder per architecture, shared by the whole session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHS}


def pytest_report_header() -> str:
    import transformers

    return f"rap: torch {torch.__version__}, transformers {transformers.__version__}"
