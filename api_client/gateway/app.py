"""The FastAPI app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions over the job queue,
plus /health and /metrics. Auth, backpressure (503 + Retry-After), errors in OpenAI's shape.

A request becomes one job per choice on `{p}:jobs`; its response is read from the jobs' result
streams. The client leaving cancels its jobs; the gateway stopping does not (another client can still
read the results)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api_client.connection import connect_async
from api_client.gateway.batches import Batches, add_batch_routes
from api_client.gateway.metrics import GatewayMetrics
from api_client.gateway.relay import Event, Relay, ResultReader
from api_client.gateway.requests import ChatCompletionRequest, CompletionRequest, _CommonRequest
from api_client.gateway.responses import SSE_DONE, Choice, Kind, ResponseBuilder, sse
from api_client.gateway.settings import GatewaySettings, is_loopback
from api_client.schema import ErrorEvent, TokenEvent, validation_message

logger = logging.getLogger("tokenrelay.gateway")

BLOCK_MS = 1000  # XREAD BLOCK per call; well under the socket timeout
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request", for the logs and metrics only
T = TypeVar("T")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers


class ClientGone(Exception):
    """The client closed the connection before its response was complete."""


_PARAM_RE = re.compile(r"^(?:params\.)?([A-Za-z_][\w.]*)(?::| cannot be compiled)")


def _param_of(message: str) -> str | None:
    """The field a job's error message names ("params.seed: ..." -> "seed")."""
    match = _PARAM_RE.match(message)
    return match.group(1) if match else None


class Gateway:
    """One gateway's state: settings, its Redis connection, metrics, and the cancels in flight."""

    def __init__(self, settings: GatewaySettings, redis: Redis | None = None) -> None:
        self.settings = settings
        self._owns_redis = redis is None
        self.redis: Any = redis if redis is not None else connect_async(
            settings.redis_url, cluster=settings.redis_cluster, socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s, health_check_interval=30)
        self.relay = Relay(self.redis, settings.keys)
        self.metrics = GatewayMetrics()
        self.api_keys = settings.api_keys()
        self.is_stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        self.is_stopping = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._owns_redis:
            await self.redis.aclose()

    # ---- auth ----------------------------------------------------------------------------------
    def authorize(self, request: Request) -> str | None:
        """The name of the request's API key (None when no key is configured), or 401/403."""
        if not self.api_keys:
            if self.settings.gateway_allow_unauthenticated or is_loopback(request.client.host if request.client else None):
                return None
            raise OpenAIError(403, "this gateway has no API key configured and serves loopback clients only; "
                              "set TOKENRELAY_GATEWAY_API_KEYS", code="forbidden")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        name = None
        for key in self.api_keys:  # every key compared, in constant time: no early exit
            if hmac.compare_digest(digest, key.digest) and scheme.lower() == "bearer":
                name = key.name
        if name is None:
            raise OpenAIError(401, "invalid API key: send Authorization: Bearer <key>", code="invalid_api_key")
        return name

    # ---- completions ---------------------------------------------------------------------------
    async def complete(self, request: Request, body: _CommonRequest, kind: Kind, key_name: str | None) -> Response:
        started = time.monotonic()
        try:
            base_id, jobs = body.jobs(self.settings.gateway_default_max_tokens, key_name)
        except ValidationError as exc:
            message = validation_message(exc)
            raise OpenAIError(400, message, param=_param_of(message)) from None
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param=_param_of(str(exc))) from None
        await self._admit(body.model)
        deadline_ms = int((time.time() + self.settings.gateway_queue_timeout_s) * 1000)
        # A job that no worker starts in time ends with "expired" there, not after its client left.
        jobs = [job.model_copy(update={"deadline_ms": deadline_ms}) for job in jobs]
        job_ids = [job.id for job in jobs if job.id is not None]
        await self.relay.submit(jobs)
        logger.info("request=%s kind=%s jobs=%d stream=%s key=%s", base_id, kind, len(jobs), body.stream, key_name)
        num_logprobs = body.num_logprobs()
        builder = ResponseBuilder(kind, base_id, body.model, num_logprobs)
        reader = self.relay.reader(job_ids)
        choices = [Choice(i) for i in range(len(jobs))]
        headers = {"x-tokenrelay-job-ids": ",".join(job_ids)}
        num_prompts = len(jobs) // body.n
        self.metrics.in_flight.inc()
        streaming = False
        try:
            first = await self._until_disconnect(request, self._first_events(reader, job_ids))
            self.metrics.ttft_s.observe(time.monotonic() - started)
            if not body.stream:
                await self._until_disconnect(request, self._collect(reader, choices, first))
                prompt_tokens = sum(choices[p * body.n].prompt_tokens for p in range(num_prompts))
                self.metrics.completion_tokens.inc(sum(len(c.token_ids) for c in choices))
                return JSONResponse(builder.body(choices, prompt_tokens), headers=headers)
            _raise_first_error(first, self.settings.gateway_retry_after_s)
            streaming = True
            return StreamingResponse(
                self._stream(reader, choices, first, builder, body.include_usage, body.n, num_prompts, started),
                media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
        except ClientGone:
            self._cancel_later(reader.open_job_ids)
            return Response(status_code=CLIENT_CLOSED_STATUS)
        except BaseException:
            self._cancel_later(reader.open_job_ids)
            raise
        finally:
            if not streaming:
                self.metrics.in_flight.dec()
                self.metrics.duration_s.observe(time.monotonic() - started)

    async def _admit(self, model: str) -> None:
        """503 when no worker is alive or the queue is too deep, 404 for a model no worker serves."""
        retry = {"retry-after": str(self.settings.gateway_retry_after_s)}
        live = await self.relay.live_state()
        if live.num_workers == 0:
            live = await self.relay.live_state(fresh=True)  # one may have started since the last look
        if live.num_workers == 0:
            self.metrics.rejected.labels("no_worker").inc()
            raise OpenAIError(503, "no tokenrelay worker is alive; retry later", type="server_error",
                              code="no_worker", headers=retry)
        if not live.serves(model):
            raise OpenAIError(404, f"the model {model!r} is not served here (served: "
                              f"{', '.join(sorted(live.models))}); see GET /v1/models",
                              param="model", code="model_not_found")
        max_depth = self.settings.gateway_max_queue_depth
        if max_depth and live.queue_depth > max_depth:
            self.metrics.rejected.labels("queue_full").inc()
            raise OpenAIError(503, f"{live.queue_depth} jobs are waiting (limit {max_depth}); retry later",
                              type="server_error", code="overloaded", headers=retry)

    async def _first_events(self, reader: ResultReader, job_ids: list[str]) -> list[tuple[int, Event]]:
        """The first events of the request's jobs, or 503 once the queue timeout has passed."""
        deadline = time.monotonic() + self.settings.gateway_queue_timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                self.metrics.rejected.labels("queue_timeout").inc()
                raise OpenAIError(503, f"no worker started the job within {self.settings.gateway_queue_timeout_s:g} s;"
                                  " retry later", type="server_error", code="timeout",
                                  headers={"retry-after": str(self.settings.gateway_retry_after_s)})
            events = await reader.read(min(BLOCK_MS, left_ms))
            if events:
                return events

    async def _collect(self, reader: ResultReader, choices: list[Choice], events: list[tuple[int, Event]]) -> None:
        while True:
            for index, event in events:
                if isinstance(event, ErrorEvent):
                    raise _job_error(event, self.settings.gateway_retry_after_s)
                if isinstance(event, TokenEvent):
                    choices[index].add_tokens(event)
                else:
                    choices[index].finish(event)
            if reader.is_done:
                return
            events = await reader.read(BLOCK_MS)

    async def _stream(self, reader: ResultReader, choices: list[Choice], events: list[tuple[int, Event]],
                      builder: ResponseBuilder, include_usage: bool, n: int, num_prompts: int,
                      started: float) -> AsyncIterator[str]:
        try:
            for choice in choices:
                yield (builder.chunk(choice.index, role=True, text="", with_usage_field=include_usage)
                       if builder.kind == "chat" else "")
            while True:
                for index, event in events:
                    choice = choices[index]
                    if isinstance(event, ErrorEvent):
                        self._cancel_later(reader.open_job_ids)
                        error = _job_error(event, self.settings.gateway_retry_after_s)
                        yield sse(error.body)
                        yield SSE_DONE
                        return
                    if isinstance(event, TokenEvent):
                        text = choice.add_tokens(event)
                        if text or event.logprobs:
                            yield builder.chunk(index, text=text, token_ids=event.token_ids, logprobs=event.logprobs,
                                                with_usage_field=include_usage)
                        continue
                    rest = choice.finish(event)
                    if rest:
                        yield builder.chunk(index, text=rest, with_usage_field=include_usage)
                    yield builder.chunk(index, text=None if builder.kind == "chat" else "",
                                        finish_reason=choice.finish_reason, with_usage_field=include_usage)
                if reader.is_done:
                    break
                events = await reader.read(BLOCK_MS)
            self.metrics.completion_tokens.inc(sum(len(c.token_ids) for c in choices))
            if include_usage:
                yield builder.usage_chunk(choices, sum(choices[p * n].prompt_tokens for p in range(num_prompts)))
            yield SSE_DONE
        finally:
            # Cancelled here when the client left (or, on shutdown, the server closed the stream).
            if not reader.is_done:
                self._cancel_later(reader.open_job_ids)
            self.metrics.in_flight.dec()
            self.metrics.duration_s.observe(time.monotonic() - started)

    def _cancel_later(self, job_ids: list[str]) -> None:
        """Cancel jobs whose client left, from a task of its own: the caller may be inside a cancelled
        scope where it can await nothing. A stopping gateway cancels nothing: the jobs run on, and
        their results stay readable from Redis."""
        if not job_ids or self.is_stopping:
            return
        self.metrics.cancelled.inc(len(job_ids))
        logger.info("jobs=%s event=cancel reason=client_gone", ",".join(job_ids))
        task = asyncio.get_running_loop().create_task(self._cancel(job_ids))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel(self, job_ids: list[str]) -> None:
        try:
            await self.relay.cancel(job_ids)
        except RedisError as exc:
            logger.warning("jobs=%s cancel failed: %s", ",".join(job_ids), exc)

    @staticmethod
    async def _until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`; ClientGone if the client disconnects first (its work is cancelled)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if task in done:
            return task.result()
        raise ClientGone


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


_JOB_ERROR_STATUS = {"invalid_request": 400, "too_long": 400, "expired": 503, "overloaded": 503, "internal": 500}


def _job_error(event: ErrorEvent, retry_after_s: int) -> OpenAIError:
    status = _JOB_ERROR_STATUS.get(event.code, 500)
    code = "context_length_exceeded" if event.code == "too_long" else event.code
    return OpenAIError(status, event.message or event.code, type="invalid_request_error" if status == 400
                       else "server_error", param=_param_of(event.message), code=code,
                       headers={"retry-after": str(retry_after_s)} if status == 503 else None)


def _raise_first_error(events: list[tuple[int, Event]], retry_after_s: int) -> None:
    """A job that fails before its first token fails the request with an HTTP status, not a stream."""
    for _, event in events:
        if isinstance(event, ErrorEvent):
            raise _job_error(event, retry_after_s)


def create_app(settings: GatewaySettings | None = None, *, redis: Redis | None = None) -> FastAPI:
    settings = settings if settings is not None else GatewaySettings()
    gateway = Gateway(settings, redis)
    batches = Batches(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.is_loopback_only and not is_loopback(settings.gateway_host):
            logger.warning("no API key is configured: only loopback clients are served "
                           "(set TOKENRELAY_GATEWAY_API_KEYS, or TOKENRELAY_GATEWAY_ALLOW_UNAUTHENTICATED=true)")
        batches.start()
        yield
        await batches.close()
        await gateway.close()

    app = FastAPI(title="tokenrelay gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        param = _field_path(tuple(err.get("loc", ())))
        if err.get("type") == "extra_forbidden":
            message = f"{param}: this parameter is not supported by tokenrelay"
        else:
            message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return JSONResponse(OpenAIError(400, message, param=param).body, status_code=400)

    @app.exception_handler(RedisError)
    async def _redis_error(_: Request, exc: RedisError) -> JSONResponse:
        gateway.metrics.rejected.labels("redis").inc()
        logger.warning("redis error: %s", exc)
        return JSONResponse(OpenAIError(503, "the job queue is unreachable; retry later", type="server_error",
                                        code="queue_unavailable").body, status_code=503,
                            headers={"retry-after": str(settings.gateway_retry_after_s)})

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        gateway.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            live = await gateway.relay.live_state()
        except RedisError as exc:
            return JSONResponse({"status": "unavailable", "redis": False, "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "redis": True, "workers": live.num_workers,
                             "models": sorted(live.models), "queue_depth": live.queue_depth})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # A dependency runs before the body is validated: a bad key is 401 whatever the body holds.
    api_key = Depends(gateway.authorize)

    @app.get("/v1/models")
    async def models(_: str | None = api_key) -> JSONResponse:
        live = await gateway.relay.live_state(fresh=True)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tokenrelay"} for name in sorted(live.models)]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest, key: str | None = api_key) -> Response:
        return await gateway.complete(request, body, "chat", key)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest, key: str | None = api_key) -> Response:
        return await gateway.complete(request, body, "completion", key)

    add_batch_routes(app, batches, api_key, lambda exc: OpenAIError(
        exc.status, exc.message, param=exc.param, code=exc.code or ("not_found" if exc.status == 404 else None)))

    return app


def _field_path(loc: tuple[Any, ...]) -> str | None:
    """The dotted field path of a validation error's location, without "body" and the type tags
    pydantic adds for union members ("str", "list[int]", "function-after[...]")."""
    parts = [str(p) for p in loc if p != "body" and str(p) not in _TYPE_TAGS and not any(c in str(p) for c in "[-")]
    return ".".join(parts) or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})

