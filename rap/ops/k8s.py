"""KubeRay manifests kept in sync with the serve config: `python -m rap.ops.k8s [--check]`.

The RayService's `serveConfigV2` is `deployments/serve_config.yaml` with
`k8s/overlay/serve-gpu.yaml` merged over it (GPU replicas, device cuda, the trained policy on the
checkpoint volume), so the cluster runs the application the repository tests. This module
writes that string into `k8s/rayservice.yaml` in place (the rest of the manifest is hand-written
and keeps its comments) and regenerates the Grafana ConfigMap in `k8s/grafana/`. `--check`
changes nothing and exits 1 when a manifest is stale. Tokens never pass through here: pods
read them from a Secret.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from rap.core import memory
from rap.core.constants import GIB
from rap.core.loading import load_config
from rap.ops.grafana import export_texts
from rap.ops.yaml_text import dump_yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "k8s"
OVERLAY = K8S_DIR / "overlay" / "serve-gpu.yaml"
RAYSERVICE = K8S_DIR / "rayservice.yaml"
GRAFANA_DIR = K8S_DIR / "grafana"

# Host memory of a GPU worker pod besides model weights: raylet, the dashboard agent, the
# replica's Python process with torch and the CUDA runtime (~4-5 GiB seen on Ray GPU images),
# rounded up; plus Ray's object store, which lives in /dev/shm and so counts in the pod's limit.
RAY_PROCESS_BASE_GIB = 6.0
OBJECT_STORE_GIB = 1.0
MARGIN_GIB = 1.0


def serve_config_path() -> Path:
    """deployments/serve_config.yaml, found without importing the package (it imports Ray)."""
    spec = importlib.util.find_spec("deployments")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the deployments package is not installed (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))) / "serve_config.yaml"


def merge(base: Any, overlay: Any) -> Any:
    """Overlay over base, like a strategic merge patch: dicts merge key by key, lists of named
    dicts merge by `name` (new names are appended), anything else is replaced. A key set to
    null in the overlay is set to null (for example `budget_gib: null`: from the device)."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if _named_list(base) and _named_list(overlay):
        by_name = {item["name"]: item for item in overlay}
        merged = [merge(item, by_name.pop(item["name"], {})) for item in base]
        return merged + list(by_name.values())
    return overlay


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def gpu_serve_config() -> dict[str, Any]:
    """The serve config the cluster runs, validated as the app will validate it."""

    from rap.serving.config import ServeAppConfig  # lazy: heavy (torch, transformers)

    base = yaml.safe_load(serve_config_path().read_text())
    overlay = yaml.safe_load(OVERLAY.read_text())
    config: dict[str, Any] = merge(base, overlay)
    for app in config["applications"]:
        if app["import_path"] == "deployments.app:build_app":
            ServeAppConfig.model_validate(app["args"])  # a typo in the overlay fails here
    return config


def serve_config_v2() -> str:
    """The exact string the RayService's spec.serveConfigV2 holds."""
    return dump_yaml(gpu_serve_config())


def with_serve_config(manifest: str, config_v2: str) -> str:
    """The manifest text with its `serveConfigV2: |` block replaced by `config_v2`."""
    lines = manifest.splitlines(keepends=True)
    start = next(
        (i for i, line in enumerate(lines) if re.match(r"^\s*serveConfigV2: \|-?\s*$", line)), None
    )
    if start is None:
        raise ValueError("the manifest has no `serveConfigV2: |` block")
    indent = len(lines[start]) - len(lines[start].lstrip()) + 2
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) >= indent
    ):
        end += 1
    block = "".join(" " * indent + line + "\n" for line in config_v2.splitlines())
    head = lines[start].split(":")[0] + ": |\n"
    return "".join([*lines[:start], head, block, *lines[end:]])


def worker_memory_limit_bytes(
    model: str = "smollm2", dtype: str = "float16", replicas_per_pod: int = 1
) -> int:
    """Least memory limit for a GPU worker pod. A dropped block moves to pinned host memory, so
    in the worst case all of a replica's weights sit in host RAM besides the Ray processes."""

    config, _ = load_config(model)
    weights = memory.describe(config, dtype)["dense_weight_bytes"]
    fixed = (RAY_PROCESS_BASE_GIB + OBJECT_STORE_GIB + MARGIN_GIB) * GIB
    return int(fixed + replicas_per_pod * weights)


def main(argv: list[str] | None = None) -> int:
    """Regenerate k8s/ (serveConfigV2 and the Grafana ConfigMap), or check they are current."""
    parser = argparse.ArgumentParser(prog="python -m rap.ops.k8s", description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)

    wanted = {RAYSERVICE: with_serve_config(RAYSERVICE.read_text(), serve_config_v2())}
    wanted |= {GRAFANA_DIR / name: text for name, text in export_texts().items()}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in wanted:
            state = "stale" if path in stale else "current"
            print(
                f"{state}: {path.relative_to(ROOT)}",
                file=sys.stderr if state == "stale" else sys.stdout,
            )
        if stale:
            print("run python -m rap.ops.k8s to regenerate", file=sys.stderr)
        else:
            print(f"{len(wanted)} generated files match rap.ops.k8s and rap.ops.grafana")
        return 1 if stale else 0
    if not stale:
        print(f"{len(wanted)} generated files already current")
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
