"""End to end on a real local Ray cluster: the default model behind Serve, the official `openai`
client, two replicas with different budgets, operator budget changes, faults. Slow tier."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from rap.ops.ray_env import patient_serve_env

pytestmark = pytest.mark.slow

ADMIN, KEY = "test-admin-token", "test-api-key"
MODEL = "SmolLM2-135M-Instruct"
COUNT = "Count from 1 to 100: 1, 2, 3, 4,"  # greedy, a long answer that does not stop early


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory):
    """`RAP_FAULT_DIR` for the cluster's processes (rap.serving.faults)."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def server(fault_dir):
    import ray
    from ray import serve

    from deployments.app import build_app
    from rap.core.loading import resolve

    resolve("smollm2")
    os.environ["RAP_ADMIN_TOKEN"], os.environ["RAP_API_KEY"] = ADMIN, KEY
    os.environ["RAP_FAULT_DIR"] = str(fault_dir)  # inherited by Ray's workers
    port = _free_port()
    patient_serve_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {
        "model": "smollm2",
        # The RAP policy explicitly (the default is search on the surrogate): this module
        # serves it live; the redeploy test below and tests/e2e/test_cli_serve.py the default.
        "policy": "rap",
        "replicas": [
            {"name": "replica-0", "budget_gib": 0.6, "num_cpus": 0.5},
            {"name": "replica-1", "budget_gib": 0.45, "num_cpus": 0.5},
        ],
        "engine": {"max_batch_size": 4, "target_seq": 256, "grow_after_s": 1.0},
        "telemetry_period_s": 0.3,
        # The redeploy test's stream must end within the drain: on a busy 2-core machine its 80
        # tokens took longer than the default 30 s (the stream was cut).
        "drain_timeout_s": 120.0,
    }
    serve.run(build_app(config), name="rap", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    for var in ("RAP_ADMIN_TOKEN", "RAP_API_KEY", "RAP_FAULT_DIR"):
        os.environ.pop(var, None)


def call(
    url: str,
    path: str,
    body: dict | None = None,
    token: str | None = None,
    raw: bytes | None = None,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    method = method or ("POST" if data else "GET")
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def state(url: str) -> dict:
    status, body, _ = call(url, "/admin/state", token=ADMIN)
    assert status == 200
    return body


def wait_for(predicate, timeout_s: float = 60.0):
    end = time.time() + timeout_s
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("condition not met in time")


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def test_openai_client_completions_chat_and_stream(server) -> None:
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    out = c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert out.choices[0].text and out.usage.completion_tokens > 0
    assert out.system_fingerprint.startswith("rap-")
    chat = c.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 5
    arrivals, parts = [], []
    stream = c.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Tell me about the sea."}],
    )
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert len(parts) > 3 and arrivals[-1] - arrivals[0] > 0  # tokens came one by one
    assert chunk.usage is not None and chunk.usage.completion_tokens >= len(parts)


def test_replicas_with_different_budgets_run_different_masks(server) -> None:
    def masks():
        reps = state(server)["replicas"]
        kept = {n: t["attn_kept"] + t["mlp_kept"] for n, t in reps.items()}
        return kept if kept["replica-1"] < kept["replica-0"] else None

    c = client(server)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # traffic reaches both replicas
        list(
            pool.map(
                lambda i: c.completions.create(
                    model=MODEL, prompt=f"Count {i}", max_tokens=4, temperature=0
                ),
                range(8),
            )
        )
    kept = wait_for(masks)
    reps = state(server)["replicas"]
    assert reps["replica-1"]["weight_bytes"] <= reps["replica-1"]["budget_bytes"]
    assert kept["replica-0"] == 60


def test_a_lowered_budget_is_served_on_the_rap_policys_masks(server) -> None:
    """With `policy: rap`, the shipped RAP policy plans: after a budget drop, responses come
    from masks it decided (`controller:rap`, fewer blocks), its decisions grow and it does not
    fall back to mem-greedy. Sequential requests then go to the replica that keeps more."""
    before = state(server)["controller"]["policy"]
    assert before["kind"] == "RapPolicy" and "shipped with the package" in before["origin"], before
    status, _, _ = call(server, "/admin/budget", {"replica": "replica-0", "gib": 0.36}, ADMIN)
    assert status == 200
    c = client(server)

    def pruned_by_rap() -> str | None:
        out = c.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
        fp = out.system_fingerprint
        keep = float(fp.rsplit("-keep", 1)[1].split("-")[0])  # "...-keep0.933[-changes1]"
        return fp if "-controller:rap-keep" in fp and keep < 1.0 else None

    wait_for(pruned_by_rap)
    after = state(server)["controller"]["policy"]
    assert after["decisions"] > before["decisions"], (before, after)
    assert after["fallbacks"] == before["fallbacks"] == 0, after

    def replica0_on_rap() -> dict | None:
        reps = state(server)["replicas"]
        t = reps["replica-0"]
        on_rap = t["mask_source"] == "controller:rap" and t["attn_kept"] + t["mlp_kept"] < 60
        return reps if on_rap else None

    reps = wait_for(replica0_on_rap)  # the replica switches when its running rows are done
    tel = reps["replica-0"]
    assert tel["weight_bytes"] <= tel["budget_bytes"] == int(0.36 * 2**30)
    # Routing: load ties (one request at a time) go to the replica whose mask keeps the most.
    kept = {n: t["attn_kept"] + t["mlp_kept"] for n, t in reps.items()}
    assert kept["replica-0"] < kept["replica-1"], kept
    time.sleep(2.0)  # the router polls telemetry every period (0.3 s here)
    batches = {n: t["steps"] for n, t in state(server)["replicas"].items()}
    for i in range(4):
        c.completions.create(model=MODEL, prompt=f"One at a time {i}", max_tokens=4)
    now = {n: t["steps"] for n, t in state(server)["replicas"].items()}
    assert now["replica-0"] == batches["replica-0"], (batches, now)
    assert now["replica-1"] > batches["replica-1"], (batches, now)  # steps, several a request
    # Back to the module's starting point: replica-0 regrows to dense at its next batches (a
    # grow applies to new work); concurrent requests reach it although it keeps fewer blocks.
    status, _, _ = call(server, "/admin/budget", {"replica": "replica-0", "gib": 0.6}, ADMIN)
    assert status == 200

    def regrown() -> bool:
        def one(i: int) -> None:
            c.completions.create(model=MODEL, prompt=f"Again {i}", max_tokens=4, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(4)))
        t = state(server)["replicas"]["replica-0"]
        return t["attn_kept"] + t["mlp_kept"] == 60

    wait_for(regrown)


def test_budget_drop_gives_a_smaller_mask_and_requests_keep_working(server, tmp_path) -> None:
    from rap.cli.main import main

    token_file = tmp_path / "admin-token"  # a file, not a flag: `ps` would show a flag's value
    token_file.write_text(ADMIN + "\n")
    before = state(server)["replicas"]["replica-0"]
    assert (
        main(
            [
                "budget",
                "set",
                "--replica",
                "replica-0",
                "--gib",
                "0.35",
                "--token-file",
                str(token_file),
                "--url",
                server,
            ]
        )
        == 0
    )
    c = client(server)
    for i in range(4):
        c.completions.create(model=MODEL, prompt=f"Hello {i}", max_tokens=4, temperature=0)
    after = wait_for(
        lambda: (
            (t := state(server)["replicas"]["replica-0"])["weight_bytes"] < before["weight_bytes"]
            and t
        )
    )
    assert after["budget_bytes"] == int(0.35 * 2**30)
    assert after["weight_bytes"] <= after["budget_bytes"]
    assert after["over_budget_bytes"] == 0


def test_oversized_batch_splits_falls_back_or_503_and_never_exceeds_budget(server) -> None:
    status, _, _ = call(server, "/admin/budget", {"replica": "replica-1", "gib": 0.3}, ADMIN)
    assert status == 200
    prompt = "Write a long story about a lighthouse keeper. " * 40
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 64, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: call(server, "/v1/completions", body, KEY), range(8)))
    for status, out, headers in results:
        assert status in (200, 503), out
        if status == 503:
            assert "memory" in out["error"]["message"] and headers.get("retry-after")
    for tel in state(server)["replicas"].values():
        assert tel["over_budget_bytes"] == 0
        assert tel["weight_bytes"] <= tel["budget_bytes"]


def test_bad_input_gets_openai_style_4xx(server) -> None:
    cases = [
        (call(server, "/v1/completions", raw=b"{not json", token=KEY), 400),
        (call(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}, KEY), 404),
        (
            call(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, KEY),
            400,
        ),
        (
            call(
                server,
                "/v1/completions",
                {"model": MODEL, "prompt": "hello " * 9000, "max_tokens": 8},
                KEY,
            ),
            400,
        ),
        (call(server, "/v1/chat/completions", {"model": MODEL, "messages": []}, KEY), 400),
        (
            call(
                server,
                "/admin/mask",
                {
                    "replica": "replica-0",
                    "mask": {"model": MODEL, "attn": [True] * 3, "mlp": [True] * 3},
                },
                ADMIN,
            ),
            400,
        ),
    ]
    for (status, body, _), expected in cases:
        assert status == expected, body
        assert set(body["error"]) >= {"message", "type"}


def test_tokens_are_checked_and_refusals_change_nothing(server) -> None:
    assert call(server, "/v1/models")[0] == 401
    assert call(server, "/v1/models", token="wrong")[0] == 401
    before = state(server)["replicas"]["replica-0"]["budget_bytes"]
    for token in (None, "wrong"):
        status, body, _ = call(server, "/admin/budget", {"replica": "replica-0", "gib": 0.2}, token)
        assert status == 401 and "admin token" in body["error"]["message"]
    assert state(server)["replicas"]["replica-0"]["budget_bytes"] == before


def test_killing_the_controller_does_not_stop_serving(server) -> None:
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "RapController" in a["name"]
    ]
    assert names
    epoch_before = state(server)["controller"]["epoch"]
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    c = client(server)
    for i in range(3):
        out = c.completions.create(
            model=MODEL, prompt=f"Still there {i}?", max_tokens=4, temperature=0
        )
        assert out.choices[0].text is not None
    for tel in state(server)["replicas"].values():
        assert tel["weight_bytes"] <= tel["budget_bytes"]
    # Serve restarts the controller; it resumes with an epoch above what replicas hold.
    restarted = wait_for(
        lambda: (s := state(server)["controller"]).get("epoch") and s["epoch"] > epoch_before and s,
        timeout_s=90,
    )
    assert restarted["epoch"] > epoch_before


def test_admin_endpoints_are_off_without_a_token(server, tmp_path_factory) -> None:
    """A second app on a tiny model whose admin token variable is unset: admin answers 403."""
    from ray import serve

    from deployments.app import build_app
    from tests.tiny import save_tiny, save_tokenizer

    folder = tmp_path_factory.mktemp("tiny-served")
    save_tiny("llama", folder)
    save_tokenizer(folder)
    config = {
        "model": str(folder),
        "replicas": [{"name": "tiny-0", "num_cpus": 0.1}],
        "planner": "random",  # a tiny random model has no stored block scores
        "admin_token_env": "RAP_TEST_UNSET_TOKEN",
        "api_key_env": "RAP_TEST_UNSET_KEY",
    }
    serve.run(build_app(config), name="off", route_prefix="/off")
    try:
        status, body, _ = call(server, "/off/admin/budget", {"replica": "tiny-0", "gib": 1}, ADMIN)
        assert status == 403 and "admin endpoints are off" in body["error"]["message"]
        status, body, _ = call(server, "/off/v1/models")  # no key configured: open
        assert status == 200 and body["data"][0]["id"] == folder.name
    finally:
        serve.delete("off")


def test_stop_sequences_end_the_text_before_them_streamed_or_not(server) -> None:
    """`stop` was silently dropped for every HTTP request."""
    c = client(server)
    ask = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    base = c.completions.create(**ask).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = words[len(words) // 2]
    cut = c.completions.create(**ask, stop=[stop]).choices[0]
    assert cut.text == base[: base.find(stop)] and cut.finish_reason == "stop", (base, stop)
    parts = [
        ch.choices[0].text
        for ch in c.completions.create(**ask, stop=stop, stream=True)
        if ch.choices
    ]
    assert "".join(parts) == cut.text and stop not in "".join(parts)


def test_a_client_that_hangs_up_frees_its_row_at_once(server) -> None:
    """Closing the socket through Serve's proxy cancels the request in the engine."""
    body = {"model": MODEL, "prompt": COUNT, "max_tokens": 400, "stream": True, "temperature": 0}
    req = urllib.request.Request(server + "/v1/completions", data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {KEY}")
    resp = urllib.request.urlopen(req, timeout=120)
    for _ in range(3):
        assert resp.readline()  # streaming has begun
    resp.close()  # the client is gone

    def idle() -> bool:
        reps = state(server)["replicas"].values()
        return all(t["queue"]["running"] == 0 and t["kv_pages_in_use"] == 0 for t in reps)

    started = time.monotonic()
    wait_for(idle, timeout_s=60)
    # 400 tokens take ~20 s here; a cancelled row stops within a few steps.
    assert time.monotonic() - started < 15


def test_the_ingress_checks_credentials_and_size_before_parsing(server) -> None:
    """Unauthenticated bodies were parsed (validation details instead of 401); bodies had no
    limit; every error has OpenAI's shape."""
    status, body, _ = call(server, "/v1/completions", raw=b'{"prompt": [[[')
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = call(server, "/v1/completions", raw=b" " * (2 << 20), token=KEY)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body, _ = call(server, "/v1/completions", raw=b"[" * 100_000, token=KEY)
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body, _ = call(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}, KEY)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert call(server, "/docs", token=KEY)[0] == 404
    assert call(server, "/openapi.json")[0] == 401
    status, schema, _ = call(server, "/openapi.json", token=KEY)
    assert status == 200 and "/v1/chat/completions" in schema["paths"]


def test_seeded_sampling_repeats_and_chat_without_max_tokens_is_not_cut_at_16(server) -> None:
    c = client(server)
    ask = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0}
    out = c.completions.create(**ask, seed=1234)
    assert c.completions.create(**ask, seed=1234).choices[0].text == out.choices[0].text
    served = out.model_extra["rap"]  # the mask that served it and its predicted quality cost
    assert served["mask"] == out.system_fingerprint and served["predicted_delta_lnppl"] >= 0
    assert isinstance(served["mask_key"], str)  # its dropped blocks ("" for the dense model)
    chat = c.chat.completions.create(
        model=MODEL,
        temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Write a poem."}]}],
    )
    assert chat.usage.completion_tokens > 16 or chat.choices[0].finish_reason == "stop"


def test_a_request_deadline_stops_its_work(server) -> None:
    body = {"model": MODEL, "prompt": COUNT, "max_tokens": 400, "temperature": 0}
    started = time.monotonic()
    status, out, _ = call(server, "/v1/completions", body, KEY, headers={"X-Request-Timeout": "2"})
    assert status == 504 and "deadline passed" in out["error"]["message"]
    assert time.monotonic() - started < 15  # 400 tokens take ~20 s here

    def idle() -> bool:
        reps = state(server)["replicas"].values()
        return all(t["queue"]["running"] == 0 and t["kv_pages_in_use"] == 0 for t in reps)

    wait_for(idle, timeout_s=10)


def test_a_pushed_mask_stays_until_released_and_below_the_floor_is_400(server) -> None:
    """It was overridden within one telemetry period; below the floor it was a 200, unused."""
    call(server, "/admin/budget", {"replica": "replica-0", "gib": 0.6}, ADMIN)
    n = 30
    mask = {"model": MODEL, "attn": [True] * n, "mlp": [i < n - 4 for i in range(n)]}
    status, out, _ = call(server, "/admin/mask", {"replica": "replica-0", "mask": mask}, ADMIN)
    assert status == 200 and out["ceiling"], out
    c = client(server)

    def capped() -> dict | None:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
        t = state(server)["replicas"]["replica-0"]
        return t if t["mlp_kept"] <= n - 4 and t["mask_ceiling"] == out["ceiling"] else None

    wait_for(capped)
    time.sleep(3.0)  # ten telemetry periods: plans come and go beneath the ceiling
    assert state(server)["replicas"]["replica-0"]["mlp_kept"] <= n - 4
    low = {"model": MODEL, "attn": [i < 5 for i in range(n)], "mlp": [i < 5 for i in range(n)]}
    status, body, _ = call(server, "/admin/mask", {"replica": "replica-0", "mask": low}, ADMIN)
    assert status == 400 and "quality floor" in body["error"]["message"]
    status, out, _ = call(server, "/admin/mask?replica=replica-0", token=ADMIN, method="DELETE")
    assert status == 200 and out["released"]

    def regrown() -> bool:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
        t = state(server)["replicas"]["replica-0"]
        return t["attn_kept"] + t["mlp_kept"] == 2 * n and t["mask_ceiling"] is None

    wait_for(regrown)


def test_a_failing_device_memory_reading_is_contained_and_counted(server, fault_dir) -> None:
    """An NVML error killed the telemetry reporter; the health check failed and Serve restarted
    the replica, losing its requests."""
    before = state(server)["replicas"]["replica-1"]["errors"]
    (fault_dir / "device_memory").touch()
    try:
        wait_for(lambda: state(server)["replicas"]["replica-1"]["errors"] > before + 3)
        c = client(server)
        out = c.completions.create(model=MODEL, prompt="Still here?", max_tokens=4)
        assert out.choices[0].text is not None
    finally:
        (fault_dir / "device_memory").unlink()
    time.sleep(8.0)  # past Serve's health-check period (5 s): no restart
    errors = state(server)["replicas"]["replica-1"]["errors"]
    assert errors > before + 3  # the same replica process: its count did not reset
    time.sleep(1.0)
    assert state(server)["replicas"]["replica-1"]["errors"] == errors  # the fault is off


def test_a_malformed_plan_is_contained_and_the_plan_comes_again(server, fault_dir) -> None:
    """A malformed plan killed the reporter; a plan the replica never took was never resent."""
    before = state(server)["replicas"]["replica-1"]["errors"]
    (fault_dir / "plan").touch()
    try:
        call(server, "/admin/budget", {"replica": "replica-1", "gib": 0.42}, ADMIN)
        wait_for(lambda: state(server)["replicas"]["replica-1"]["errors"] > before)
    finally:
        (fault_dir / "plan").unlink()

    def taken() -> bool:
        s = state(server)
        plan = s["controller"]["replicas"]["replica-1"]["plan"]
        held = s["replicas"]["replica-1"]["mask_version"]
        return plan is not None and plan["version"] == held

    wait_for(taken)  # resent until the replica holds it
    assert state(server)["replicas"]["replica-1"]["budget_bytes"] == int(0.42 * 2**30)


def test_fuzzing_the_openapi_schema_finds_no_server_error(server) -> None:
    """The campaign's fuzz, short: schemathesis generates positive and negative data
    for every operation of the app's own OpenAPI schema, sent with the API key and without it
    (admin endpoints without the admin token, so the fuzz changes no budget or mask), every
    answer capped at 4 tokens and half the bodies naming the served model so that they reach a
    replica: no response is a 5xx, every 4xx of /v1 and /admin is in OpenAI's error shape, and
    the replicas ran the requests that were valid."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    auth = {"Authorization": f"Bearer {KEY}"}  # the schema is behind the API key too
    schema = schemathesis.openapi.from_url(server + "/openapi.json", headers=auth)
    steps = {n: t["steps"] for n, t in state(server)["replicas"].items()}
    seen: dict[int, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            def fuzz(case) -> None:
                if isinstance(case.body, dict):
                    if len(str(case.body)) % 2:  # half of them, deterministically
                        case.body["model"] = MODEL
                    for cap in ("max_tokens", "max_completion_tokens"):  # short answers
                        if isinstance(case.body.get(cap), int) or cap == "max_tokens":
                            case.body[cap] = 4
                for headers in (auth, {}):
                    resp = case.call(base_url=server, headers=headers, timeout=120)
                    seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
                    assert resp.status_code < 500, (case.method, case.path, case.body, resp.text)
                    if resp.status_code >= 400 and case.path.startswith(("/v1", "/admin")):
                        err = resp.json()["error"]
                        assert isinstance(err["message"], str) and isinstance(err["type"], str)

            try:
                fuzz()
            except Unsatisfiable:  # an operation without inputs has no negative data
                assert mode is GenerationMode.NEGATIVE, op.label
    assert sum(seen.values()) > 100 and any(400 <= c < 500 for c in seen), seen
    assert 200 in seen, seen
    now = {n: t["steps"] for n, t in state(server)["replicas"].items()}
    assert sum(now.values()) > sum(steps.values()), (steps, now)  # the fuzz reached them


def test_a_redeploy_drains_running_requests(server) -> None:
    """Runs last: it replaces the app. A stream that runs while the app is redeployed finishes
    on its old replica (Serve's graceful shutdown, `drain_timeout_s`); new requests reach the
    new one."""
    from ray import serve

    from deployments.app import build_app

    body = {"model": MODEL, "prompt": COUNT, "max_tokens": 80, "stream": True, "temperature": 0}
    req = urllib.request.Request(server + "/v1/completions", data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {KEY}")
    resp = urllib.request.urlopen(req, timeout=300)
    assert resp.readline().startswith(b"data: ")  # streaming has begun
    config = {
        "model": "smollm2",
        "replicas": [{"name": "replica-0", "budget_gib": 0.6, "num_cpus": 0.5}],
        "engine": {"max_batch_size": 4, "target_seq": 256},
        "telemetry_period_s": 0.4,
    }
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        redeploy = pool.submit(serve.run, build_app(config), name="rap", route_prefix="/")
        lines = resp.read().decode().splitlines()
        redeploy.result(timeout=300)
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert len(chunks) >= 10, lines  # it ran through the redeploy
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop"), chunks[-1]
    assert "error" not in chunks[-1]
    after = state(server)
    assert list(after["replicas"]) == ["replica-0"]  # the new app answers
    assert after["controller"]["policy"]["kind"] == "SurrogateSearch"  # the default policy
