"""Training the RAP agent with RLlib: load a config file, run it, keep the policy.

A config file (`rllib_configs/*.py`) defines `make(smoke: bool, env_runners: int | None) ->
TrainSpec`: the RLlib AlgorithmConfig and how long to train. `run(path, out, smoke)`:

1. connects to Ray: an existing cluster when RAY_ADDRESS is set (a KubeRay RayJob's
   entrypoint is this same command), else a local Ray on this machine;
2. trains for `iterations`, appending each iteration's metrics to `out/train_log.jsonl` and
   writing an Algorithm checkpoint to `out/checkpoints/` every `checkpoint_every` iterations
   (for resuming; these hold optimizer state and, for DQN, the replay buffer: never commit them);
3. exports the policy to `out/policy/`: `module/` (the RLModule's own checkpoint folder, loadable
   with `RLModule.from_checkpoint`, no Algorithm or env runners) and the plain network
   (`rap.planning.policy_net`: `rap-policy.json` + `policy.safetensors`, checked against the
   module's own forward pass on observations from the env), and `out/summary.json` (wall time,
   metrics).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rap.core.errors import RapError


@dataclass
class TrainSpec:
    """What a config file returns: an RLlib AlgorithmConfig and the length of the run."""

    algo: str
    config: Any
    iterations: int
    checkpoint_every: int = 10
    env_config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


def load_spec(path: str | Path, smoke: bool, env_runners: int | None = None) -> TrainSpec:
    """Run a config file and call its `make(smoke, env_runners)`."""
    p = Path(path)
    if not p.is_file():
        raise RapError(f"config file {p} does not exist", expected="a file in rllib_configs/")
    try:
        make = runpy.run_path(str(p))["make"]
    except KeyError:
        raise RapError(
            f"{p} defines no make(smoke, env_runners)", expected="a training config"
        ) from None
    spec = make(smoke=smoke, env_runners=env_runners)
    if not isinstance(spec, TrainSpec):
        raise RapError(f"{p}: make() returned {type(spec).__name__}", expected="a TrainSpec")
    return spec


CONNECT_TIMEOUT_S = 30.0
"""How long `connect` waits for a cluster it was told to join before it gives up."""


def connect(address: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """ray.init(): joins the cluster at `address` (else RAY_ADDRESS) when one is given, else
    starts a local Ray of its own. Never `address=None`: that joins whatever cluster the last
    `ray start` recorded, and when that cluster is gone Ray retries its GCS for ever. A cluster
    that does not answer within `timeout_s` is one `RapError`."""
    import ray  # lazy: heavy (ray)

    if ray.is_initialized():
        return "already initialized"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(address="local", log_to_driver=False, include_dashboard=False)
        return "local"
    _wait_for_gcs(address, timeout_s)
    ray.init(address=address, log_to_driver=False, include_dashboard=False)
    return address


def _wait_for_gcs(address: str, timeout_s: float) -> None:
    """Wait until something listens at the address's host:port ("auto": the cluster that
    `ray start` recorded), or raise. Only a reachability check: Ray does the rest."""

    target = _recorded_address() if address == "auto" else address
    hostport = target.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RapError(
            f"Ray address {address!r} is not host:port",
            expected="an address like 10.0.0.5:6379 or ray://host:10001",
        )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RapError(
                    f"no Ray cluster answered at {target} within {timeout_s:.0f} s ({exc})",
                    fix="start the cluster, or unset RAY_ADDRESS (and drop --address) to train "
                    "on a local Ray of its own",
                ) from None
            time.sleep(1.0)


def _recorded_address() -> str:
    """The GCS address the last `ray start` recorded (what `address="auto"` joins)."""

    path = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if not path.is_file():
        raise RapError(
            "RAY_ADDRESS is 'auto' but no `ray start` cluster is recorded",
            fix="start one with `ray start --head`, or unset RAY_ADDRESS",
        )
    return path.read_text().strip()


def _metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """The few numbers worth logging from an RLlib result dict (new API stack keys), as plain
    floats (RLlib reports numpy scalars, which JSON refuses)."""
    runners = result.get("env_runners", {})
    raw = {
        "return_mean": runners.get("episode_return_mean"),
        "len_mean": runners.get("episode_len_mean"),
        "episodes": runners.get("num_episodes"),
        "env_steps": result.get("num_env_steps_sampled_lifetime")
        or runners.get("num_env_steps_sampled_lifetime"),
    }
    return {k: None if v is None else float(v) for k, v in raw.items()}


def runner_nodes(algo: Any) -> list[str]:
    """The Ray node id each remote env runner runs on (none: sampling in the driver)."""
    import ray  # lazy: heavy (ray)

    group = algo.env_runner_group
    if group.num_remote_env_runners() == 0:
        return []
    where = group.foreach_env_runner(
        lambda _runner: ray.get_runtime_context().get_node_id(), local_env_runner=False
    )
    return sorted(str(n) for n in where)


def init_from(algo: Any, folder: str | Path) -> None:
    """Start from a trained policy's network: `folder` is an RLModule folder or an exported
    policy folder holding one in `module/` (only the module's weights are restored)."""
    p = Path(folder)
    p = p / "module" if (p / "module").is_dir() else p
    if not (p / "module_state.pkl").is_file():
        raise RapError(f"{folder} holds no RLModule", expected="a policy folder from rap train")
    algo.restore_from_path(str(p.resolve()), component=f"{MODULE_COMPONENT}/default_policy")
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group)


MODULE_COMPONENT = "learner_group/learner/rl_module"


def run(
    config_path: str | Path,
    out: str | Path,
    smoke: bool = False,
    env_runners: int | None = None,
    start_from: str | None = None,
    address: str | None = None,
    runner_resource: str | None = None,
) -> dict[str, Any]:
    """Train as the config says and export the policy (module doc); returns the summary.
    `runner_resource`: each env runner asks for one unit of this custom resource, so Ray
    places them only on the nodes that advertise it (`ray start --resources`)."""
    spec = load_spec(config_path, smoke, env_runners)
    if runner_resource:
        spec.config.env_runners(custom_resources_per_env_runner={runner_resource: 1})
    out = Path(out).resolve()  # RLlib reads relative paths as URIs without a scheme
    out.mkdir(parents=True, exist_ok=True)
    where = connect(address)
    start = time.time()
    algo = spec.config.build_algo()
    nodes = runner_nodes(algo)
    if start_from:
        init_from(algo, start_from)
    log = (out / "train_log.jsonl").open("w")
    last: dict[str, Any] = {}
    try:
        for it in range(1, spec.iterations + 1):
            last = {
                "iteration": it,
                "elapsed_s": round(time.time() - start, 1),
                **_metrics(algo.train()),
            }
            log.write(json.dumps(last, default=float) + "\n")
            log.flush()
            if it % spec.checkpoint_every == 0 or it == spec.iterations:
                ckpt = algo.save_to_path(str((out / "checkpoints" / f"iter_{it:04d}").resolve()))
        wall = time.time() - start
        policy = export(algo, ckpt, out / "policy", spec, wall)
    finally:
        log.close()
        algo.stop()
    summary = {
        "config": str(config_path),
        "algo": spec.algo,
        "smoke": smoke,
        "ray": where,
        "env_runner_nodes": nodes,
        "start_from": start_from,
        "iterations": spec.iterations,
        "wall_s": round(wall, 1),
        "last": last,
        "policy": str(policy),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def module_folder(algo_checkpoint: str | Path) -> Path:
    """The RLModule's folder inside an Algorithm checkpoint (the only part to commit)."""
    p = Path(algo_checkpoint) / MODULE_COMPONENT / "default_policy"
    if not p.is_dir():
        raise RapError(f"{algo_checkpoint} holds no RLModule at {p}")
    return p


def export(algo: Any, ckpt: str | Path, dest: Path, spec: TrainSpec, wall_s: float) -> Path:
    """Copy the RLModule folder and write the checked plain network into `dest`."""
    from ray.rllib.core.rl_module.rl_module import RLModule  # lazy: heavy (ray)

    from rap.agent.env import ServingSimEnv  # lazy: heavy (gymnasium)
    from rap.agent.export import export_module  # lazy: heavy (torch, ray, gymnasium)

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(module_folder(ckpt), dest / "module")
    module = RLModule.from_checkpoint(str(dest / "module"))
    env = ServingSimEnv(spec.env_config)
    meta = {
        "algo": spec.algo,
        "model": env.model_id,
        "dtype": env.dtype,
        "scores": spec.env_config.get("scores", "bi"),
        "min_kept_fraction": spec.env_config.get("min_kept_fraction", 0.0),
        "importance": [float(x) for x in env.importance],
        "train_wall_s": round(wall_s, 1),
        "iterations": spec.iterations,
        "notes": spec.notes,
    }
    export_module(module, spec.algo, env, meta, dest)
    return dest
