"""The OpenAI Batch API on the gateway: /v1/files and /v1/batches over api_client.batches.BatchStore, and
the collector every replica runs (a lock per batch lets one of them collect it at a time).

The store speaks synchronous redis-py; its calls run in a worker thread (asyncio.to_thread), so the event
loop that streams completions never waits on a batch's pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api_client.batches import BatchApiError, BatchConfig, BatchStore, tagged_layout_refusal
from api_client.gateway.settings import GatewaySettings

logger = logging.getLogger("tokenrelay.gateway")
T = TypeVar("T")


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


class Batches:
    """The gateway's batch store and its collector loop."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.socket_timeout_s,
                                          socket_connect_timeout=settings.socket_timeout_s)
        self.store: Any = _Refused() if settings.keys.is_tagged else BatchStore(self.redis, settings.keys, BatchConfig(
            max_file_bytes=settings.gateway_max_file_bytes, file_ttl_s=settings.gateway_file_ttl_s,
            lock_ttl_s=settings.gateway_batch_lock_ttl_s, default_max_tokens=settings.gateway_default_max_tokens))
        self.owner = f"gateway-{uuid.uuid4().hex}"  # this replica's name on the batches it collects
        self._task: asyncio.Task[None] | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call in a thread; BatchApiError becomes the caller's HTTP error."""
        return await asyncio.to_thread(fn, *args)

    def start(self) -> None:
        if isinstance(self.store, _Refused):
            return  # nothing to collect: every batch route answers 501
        self._task = asyncio.create_task(self._collect_forever(), name="batch-collector")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.redis.close)

    async def _collect_forever(self) -> None:
        while True:
            try:
                for batch_id in await self.call(self.store.open_batches):
                    await self.call(self.store.collect, batch_id, self.owner)
            except (redis.RedisError, OSError) as exc:
                logger.warning("batch collector: %s", exc)
            except Exception:  # a bug in one round must not stop collection for good
                logger.exception("batch collector failed")
            await asyncio.sleep(self.settings.gateway_batch_poll_s)


class _Refused:
    """The store in the tagged key layout: every operation answers the Batch API's 501 refusal."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def refuse(*_: Any) -> Any:
            raise tagged_layout_refusal()
        return refuse


def add_batch_routes(app: FastAPI, batches: Batches, api_key: Any,
                     error: Callable[[BatchApiError], Exception]) -> None:
    """POST/GET /v1/files, GET /v1/files/{id}/content, POST/GET /v1/batches, POST /v1/batches/{id}/cancel."""

    async def run(fn: Callable[..., T], *args: Any) -> T:
        try:
            return await batches.call(fn, *args)
        except BatchApiError as exc:
            raise error(exc) from None

    @app.post("/v1/files")
    async def create_file(file: UploadFile = File(...), purpose: str = Form(...),  # noqa: B008
                          _: str | None = api_key) -> JSONResponse:
        limit = batches.settings.gateway_max_file_bytes
        content = await file.read(limit + 1)  # one byte over the cap is enough to refuse it
        return JSONResponse(await run(batches.store.create_file, content, file.filename or "input.jsonl", purpose))

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, _: str | None = api_key) -> JSONResponse:
        return JSONResponse(await run(batches.store.file, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def get_file_content(file_id: str, _: str | None = api_key) -> Response:
        return Response(await run(batches.store.file_content, file_id), media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create_batch(body: CreateBatchRequest, key: str | None = api_key) -> JSONResponse:
        return JSONResponse(await run(batches.store.create_batch, body.input_file_id, body.endpoint,
                                      body.completion_window, body.metadata, key))

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, _: str | None = api_key) -> JSONResponse:
        return JSONResponse(await run(batches.store.batch, batch_id))

    @app.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = Query(default=20),
                           _: str | None = api_key) -> JSONResponse:
        return JSONResponse(await run(batches.store.list_batches, after, limit))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, _: str | None = api_key) -> JSONResponse:
        return JSONResponse(await run(batches.store.cancel, batch_id))
