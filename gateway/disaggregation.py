"""Prefill/decode disaggregation: a long prompt is prefilled on a prefill worker, and its KV moves to
the decode worker that streams the answer; a short one is prefilled by the decode worker itself.

The dispatcher chooses the decode worker first (by load; a session keeps its worker, so the
conversation's KV stays there). What that worker does not hold of the prompt decides the path:
below ``pd_min_remote_prefill_tokens`` moving KV costs more than computing it, and the decode worker
prefills locally; above it, a prefill worker is chosen cache-aware and the request goes through it,
in the protocol its engine speaks:

* **kv_transfer_params** (vLLM's disaggregated serving; our engine speaks it too): the prefill worker
  first, with ``max_tokens`` 1, no stream and ``kv_transfer_params.do_remote_decode``; its answer's
  ``kv_transfer_params`` (where its KV is) then go with the request to the decode worker, which pulls
  the blocks it lacks and decodes. A prefill that fails costs nothing but time: the decode worker
  prefills locally.
* **bootstrap** (SGLang's PD mode): ``bootstrap_host``, ``bootstrap_port`` (the prefill worker's KV
  bootstrap server) and a random ``bootstrap_room`` go to both workers at once; the prefill worker
  pushes the KV to the decode worker, whose stream is returned. The prefill leg's answer is read and
  dropped.

Only the gateway sets these fields: ``gateway.dispatch.upstream_body`` drops any a client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway.metrics import GatewayMetrics
from gateway.policies import Decision
from gateway.proxy import Proxy, UpstreamFailed
from gateway.router import PreparedRequest, Router
from gateway.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

SGLANG_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default


@dataclass
class Leg:
    """The decode worker's request, once the prefill side is arranged."""

    body: bytes
    path: str  # "remote" (prefilled on ``prefill_worker``), "local", or "fallback" (the prefill failed)
    prefill_worker: Worker | None = None
    prefill_task: asyncio.Task | None = None  # bootstrap mode: the prefill leg, running alongside

    def cancel(self) -> None:
        if self.prefill_task is not None:
            self.prefill_task.cancel()

    async def finish(self) -> None:
        """The decode leg is over: a prefill leg still running has nobody left to serve."""
        if self.prefill_task is not None:
            if not self.prefill_task.done():
                self.prefill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.prefill_task


class Disaggregation:
    def __init__(
        self, router: Router, pool: WorkerPool, proxy: Proxy, metrics: GatewayMetrics, paths: dict[str, str]
    ) -> None:
        self.router, self.pool, self.proxy, self.metrics, self.paths = router, pool, proxy, metrics, paths

    async def arrange(self, req: PreparedRequest, decode: Decision, upstream_body: bytes) -> Leg:
        """Prefill remotely or not, for a request bound to ``decode.worker``; never raises for a
        prefill worker's failure (the decode worker then prefills)."""
        body = orjson.loads(upstream_body)
        uncached = len(req.prompt_ids) - decode.predicted_cached_tokens
        if uncached < self.router.routing.pd_min_remote_prefill_tokens:
            return self._leg(req, body, "local")
        try:
            prefill = await self.router.choose(req, exclude=set(), prefill=True)
        except Exception:  # no prefill worker available
            return self._leg(req, body, "fallback")
        worker = prefill.worker
        if worker.kind == "sglang":
            return self._bootstrap(req, body, worker)
        try:
            params = await self._prefill(req, body, worker)
        except UpstreamFailed as exc:
            if not exc.answered:
                self.pool.record_failure(worker)
            log.warning(
                "request %s: prefill on %s failed (%s): its decode worker prefills",
                req.request_id,
                worker.url,
                exc,
            )
            return self._leg(req, body, "fallback", worker)
        return self._leg(req, {**body, "kv_transfer_params": params}, "remote", worker)

    def _leg(
        self,
        req: PreparedRequest,
        body: dict[str, Any],
        path: str,
        worker: Worker | None = None,
        task: asyncio.Task | None = None,
    ) -> Leg:
        self.metrics.pd_request(path)
        return Leg(orjson.dumps(body), path, worker, task)

    async def _prefill(self, req: PreparedRequest, body: dict[str, Any], worker: Worker) -> dict[str, Any]:
        """vLLM style: run the prefill leg to its end; returns the parameters for the decode leg."""
        leg = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        leg["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
        if req.kind == "generate":
            leg["sampling_params"] = {**(body.get("sampling_params") or {}), "max_new_tokens": 1}
        else:
            leg["max_tokens"] = 1
            leg.pop("max_completion_tokens", None)
        with self.pool.dispatch(worker):
            reply = await self.proxy.call_json(
                worker.url + self.paths[req.kind], orjson.dumps(leg), req.request_id
            )
        params = reply.get("kv_transfer_params")
        if not isinstance(params, dict) or len(orjson.dumps(params)) > 2**20:
            raise UpstreamFailed("the prefill worker's answer carries no kv_transfer_params")
        self.pool.record_success(worker)
        await self.router.claim(req, worker)
        return params

    def _bootstrap(self, req: PreparedRequest, body: dict[str, Any], worker: Worker) -> Leg:
        """SGLang style: the same request to both sides, tied by a bootstrap room."""
        fields = {
            "bootstrap_host": urlsplit(worker.url).hostname,
            "bootstrap_port": worker.bootstrap_port or SGLANG_BOOTSTRAP_PORT,
            "bootstrap_room": secrets.randbits(63),
        }
        leg = {**{k: v for k, v in body.items() if k not in ("stream", "stream_options")}, **fields}
        task = asyncio.create_task(self._bootstrap_prefill(req, orjson.dumps(leg), worker))
        return self._leg(req, {**body, **fields}, "remote", worker, task)

    async def _bootstrap_prefill(self, req: PreparedRequest, leg: bytes, worker: Worker) -> bool:
        with self.pool.dispatch(worker):
            try:
                await self.proxy.call_json(worker.url + self.paths[req.kind], leg, req.request_id)
            except UpstreamFailed as exc:
                self.pool.record_failure(worker)
                log.warning("request %s: prefill leg on %s failed: %s", req.request_id, worker.url, exc)
                return False
        self.pool.record_success(worker)
        await self.router.claim(req, worker)
        return True
