"""A web backend in front of tokenrelay: POST /generate enqueues a job (AsyncClient), GET /stream/{job_id}
relays its tokens as Server-Sent Events, GET / serves a one-page browser client.

Run: TOKENRELAY_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_sse.app:app --port 8000"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field

from api_client import AsyncClient, JobError, TokenEvent, dump_event
from api_client.client import DEFAULT_REDIS_URL
from api_client.keys import DEFAULT_PREFIX
from api_client.schema import JOB_ID_PATTERN, MAX_JOB_ID_LEN

INDEX_HTML = Path(__file__).with_name("index.html")
STREAM_TIMEOUT_S = 300.0  # a browser tab waits at most this long for a job's final event
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


class GenerateRequest(BaseModel):
    """What the page posts: chat messages (or a raw prompt, sent to the model as is), and a few sampling
    knobs. The defaults suit a small instruct model such as the embedded SmolLM2 (its card suggests a
    low temperature with top_p 0.9): higher temperatures make a 135M model ramble."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = Field(default=256, ge=1, le=4096)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)


class GenerateReply(BaseModel):
    job_id: str
    stream_url: str


def sse_frame(event: str, data: str, event_id: int | None = None) -> str:
    """One Server-Sent Events frame (data holds one line of JSON, so one `data:` field suffices)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


def create_app(redis_url: str | None = None, prefix: str | None = None) -> FastAPI:
    redis_url = redis_url or os.environ.get("TOKENRELAY_REDIS_URL", DEFAULT_REDIS_URL)
    prefix = prefix or os.environ.get("TOKENRELAY_PREFIX", DEFAULT_PREFIX)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncClient(redis_url, prefix=prefix) as client:
            app.state.tokenrelay = client
            yield

    app = FastAPI(title="tokenrelay SSE example", lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return INDEX_HTML.read_text(encoding="utf-8")

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> GenerateReply:
        client: AsyncClient = request.app.state.tokenrelay
        try:
            job_id = await client.submit(body.prompt, messages=body.messages, max_tokens=body.max_tokens,
                                         temperature=body.temperature, top_p=body.top_p)
        except JobError as exc:  # the wire schema refused it: say why, as FastAPI does for its own checks
            raise HTTPException(status_code=422, detail=exc.message) from None
        return GenerateReply(job_id=job_id, stream_url=f"/stream/{job_id}")

    @app.get("/stream/{job_id}")
    async def stream(job_id: Annotated[str, PathParam(pattern=JOB_ID_PATTERN, max_length=MAX_JOB_ID_LEN)],
                     request: Request,
                     last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
        client: AsyncClient = request.app.state.tokenrelay
        # EventSource reconnects with Last-Event-ID = the number of tokens it already has; the result
        # stream replays from its start, so the deltas it has seen are skipped.
        num_seen = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
        return StreamingResponse(_relay(client, job_id, num_seen), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    return app


async def _relay(client: AsyncClient, job_id: str, num_seen: int) -> AsyncIterator[str]:
    num_tokens = 0
    try:
        async for event in client.stream(job_id, timeout=STREAM_TIMEOUT_S):
            if isinstance(event, TokenEvent):
                num_tokens = event.index + len(event.token_ids)
                if num_tokens <= num_seen:
                    continue
            yield sse_frame(event.type, dump_event(event), num_tokens)
    except TimeoutError:
        # Not a protocol event: the job may still finish; the page says so and stops listening.
        payload = {"type": "timeout", "message": f"no final event within {STREAM_TIMEOUT_S:.0f} s"}
        yield sse_frame("timeout", json.dumps(payload))


app = create_app()
