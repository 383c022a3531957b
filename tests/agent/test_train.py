"""`rap train --smoke` with PPO and DQN on one local Ray (slow tier), and the exports it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rap.cli.main import main
from rap.planning.policy_net import PolicyNet

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_smoke_trains_and_exports_a_policy(
    algo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / algo
    monkeypatch.chdir(tmp_path)  # dqn writes to a relative --out (RLlib once took it for a URI)
    code = main(
        [
            "train",
            "--config",
            str(ROOT / "rllib_configs" / f"{algo}.py"),
            "--smoke",
            "--out",
            str(out) if algo == "ppo" else algo,
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == algo and summary["iterations"] == 2
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in log] == [1, 2]
    assert (out / "policy" / "module" / "module_state.pkl").is_file()
    net = PolicyNet.load(out / "policy")
    assert net.meta["algo"] == algo and net.num_actions == 61
    mask = np.zeros(net.num_actions, dtype=np.float32)
    mask[[0, 7]] = 1.0
    assert net.act(np.zeros(net.obs_dim, dtype=np.float32), mask) in (0, 7)


def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--config", str(tmp_path / "nope.py"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
