"""Router: the HTTP ingress. OpenAI-compatible endpoints, admin endpoints, replica choice.

Before any body is read, `rap.serving.http_guard` checks the API key or admin token, the
per-client rate limit and the body's size; every error has OpenAI's shape (400, never FastAPI's
422). The router sends each request to the least-loaded replica (ties: the one whose mask keeps
the most, `rap.serving.routing`) and retries a 503 once on another (not one waited out).
Replicas are separate deployments (replica-0, ...), so the router and operators can address
each by a stable name.
`/openapi.json` is served (behind the API key when one is set); `/docs` and `/redoc` are not
(their pages load scripts from a CDN that an offline cluster cannot reach).
"""

import asyncio
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from rap.core.constants import GIB
from rap.core.loading import load_config
from rap.serving.config import ServeAppConfig
from rap.serving.http_guard import Guard, install, request_timeout_s
from rap.serving.messages import BudgetChange, MaskPush
from rap.serving.openai_api import ChatRequest, CompletionRequest, HTTPError
from rap.serving.openai_relay import Relay
from rap.serving.routing import (
    ReplicaLoad,
    kept_fraction,
    order,
    readiness,
    relayed,
    replica_failed,
    watch,
    worth_retrying,
)

app = FastAPI(title="RAP Serve", docs_url=None, redoc_url=None)
guard = Guard()  # filled in by the Router when it starts (one Router per process)
install(app, guard)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class Router:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, app_config: dict[str, Any], controller: Any, replicas: dict[str, Any]
    ) -> None:
        cfg = ServeAppConfig.model_validate(app_config)
        self.served_name = cfg.served_name or load_config(cfg.model)[1]
        self.controller, self.replicas = controller, replicas
        self.loads = {name: ReplicaLoad() for name in replicas}
        guard.config, self.http = cfg.http, cfg.http
        guard.api_key = os.environ.get(cfg.api_key_env) or None
        guard.admin_token = os.environ.get(cfg.admin_token_env) or None
        fetch = lambda n: replicas[n].telemetry.remote()  # noqa: E731
        self._watcher = asyncio.get_running_loop().create_task(
            watch(self.loads, fetch, cfg.telemetry_period_s)
        )

    # -- OpenAI endpoints -----------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        card = {"id": self.served_name, "object": "model", "created": 0, "owned_by": "rap-serve"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        try:
            prompt = body.prompt_text()
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        return await self._serve(body, {"prompt": prompt}, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request) -> Any:
        most = self.http.max_messages
        if len(body.messages) > most:
            raise HTTPError(400, f"at most {most} messages, got {len(body.messages)}")
        messages = [m.model_dump() for m in body.messages]
        return await self._serve(body, {"messages": messages}, request, chat=True)

    async def _serve(self, body: Any, prompt: dict[str, Any], request: Request, chat: bool) -> Any:
        if body.model != self.served_name:
            raise HTTPError(
                404,
                f"The model `{body.model}` does not exist; this server serves `{self.served_name}`",
                code="model_not_found",
            )
        sampling = {k: getattr(body, k) for k in ("temperature", "top_p", "seed")}
        sampling["min_kept_fraction"] = body.min_kept_fraction
        sampling["ignore_eos"] = body.ignore_eos
        call = {"model": body.model, **prompt, "max_tokens": body.max_new_tokens(), **sampling}
        call["stop"] = body.stop_list()
        call["timeout_s"] = request_timeout_s(request.headers.get("x-request-timeout"), self.http)
        name, events, first = await self._start(call)
        if first["type"] == "error":
            self.loads[name].inflight -= 1
            retry = first.get("retry_after")
            raise HTTPError(
                first["status"],
                first["message"],
                "server_error" if first["status"] >= 500 else "invalid_request_error",
                {"Retry-After": str(retry)} if retry else None,
                code=first.get("code"),
            )
        relay = Relay(self.served_name, chat, body.include_usage())
        relay.started(first)
        tracked = self._tracked(name, events)
        if body.stream:
            return StreamingResponse(relay.stream(tracked), media_type="text/event-stream")
        status, out = await relay.whole(tracked)
        return JSONResponse(out, status, headers={"Retry-After": "2"} if status == 503 else None)

    async def _start(self, call: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
        """Best replica first (`rap.serving.routing.order`); a 503 is retried once, unless
        the request waited it out (`rap.serving.routing.worth_retrying`)."""
        ranked = order(self.loads)
        for attempt, name in enumerate(ranked[:2]):
            self.loads[name].inflight += 1
            events = self.replicas[name].options(stream=True).generate.remote(call)
            try:
                first = await events.__anext__()
            except BackPressureError:  # the replica's Serve queue is full: a 503 like its own
                first = {
                    "type": "error",
                    "status": 503,
                    "retry_after": 2,
                    "message": f"{name} is busy: its queue is full",
                }
            except Exception as exc:  # dead or restarting: a 503, and the next replica tries
                self.loads[name].mark_failed()
                first = replica_failed(name, exc)
            if worth_retrying(first) and attempt == 0 and len(ranked) > 1:
                self.loads[name].inflight -= 1
                events.cancel()
                continue
            return name, events, first
        raise AssertionError("unreachable: the loop returns on its last attempt")

    async def _tracked(self, name: str, events: Any) -> Any:
        """Relay a replica's events; a client that goes away cancels the request there."""
        try:
            async for event in relayed(name, events, self.loads[name]):
                yield event
        finally:
            events.cancel()  # a no-op once the stream ended
            self.loads[name].inflight -= 1

    # -- admin endpoints (the guard has checked the admin token) ----------------------------
    def _replica(self, name: str) -> Any:
        if name not in self.replicas:
            raise HTTPError(404, f"no replica {name!r}; replicas: {sorted(self.replicas)}")
        return self.replicas[name]

    @app.post("/admin/budget")
    async def set_budget(self, body: BudgetChange) -> dict[str, Any]:
        out: dict[str, Any] = await self._replica(body.replica).set_budget.remote(
            int(body.gib * GIB)
        )
        if "error" in out:  # the replica's engine did not apply it in time
            raise HTTPError(out.get("status", 503), out["error"])
        return out

    @app.post("/admin/mask")
    async def push_mask(self, body: MaskPush) -> dict[str, Any]:
        """The mask becomes the replica's ceiling until DELETE /admin/mask releases it."""
        out = await self._replica(body.replica).push_mask.remote(body.mask)
        if "error" in out:  # 400: a mask refused; 503: the engine did not apply it in time
            raise HTTPError(out.get("status", 400), out["error"])
        return out

    @app.delete("/admin/mask")
    async def release_mask(self, replica: str) -> dict[str, Any]:
        """DELETE /admin/mask?replica=NAME: plans and budgets alone decide again."""
        out: dict[str, Any] = await self._replica(replica).push_mask.remote(None)
        if "error" in out:  # the engine did not apply it in time
            raise HTTPError(out.get("status", 503), out["error"])
        return out

    @app.get("/admin/state")
    async def state(self) -> dict[str, Any]:
        names = sorted(self.replicas)
        tels = await asyncio.gather(
            *(asyncio.wait_for(self.replicas[n].telemetry.remote(), 5.0) for n in names),
            return_exceptions=True,
        )
        replicas: dict[str, Any] = {}
        for n, tel in zip(names, tels, strict=True):
            if isinstance(tel, BaseException):  # dead, restarting or stopped: say so, go on
                replicas[n] = {"error": f"unreachable: {type(tel).__name__}"}
                continue
            self.loads[n].heard(kept_fraction(tel))
            replicas[n] = tel
        try:
            controller = await asyncio.wait_for(self.controller.state.remote(), timeout=2.0)
        except Exception as exc:  # the controller may be down: replicas still answer
            controller = {"error": f"controller unreachable: {type(exc).__name__}"}
        return {"replicas": replicas, "controller": controller}

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 once every replica answers, else 503 naming those still starting (routing)."""
        status, body = readiness(self.loads)
        return JSONResponse(body, status, headers={"Retry-After": "2"} if status == 503 else None)
