"""The Celery face of wire protocol v1 for producers: task name, JSON-only config, typed send helpers.

The producer passes its own Celery app (celery is imported only for type hints) and nothing here imports
torch or worker code, so a web backend sends `tokenrelay.generate` tasks validated like `Client.submit`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from api_client.client import JobFailed
from api_client.schema import (
    JOB_ID_PATTERN,
    MAX_JOB_ID_LEN,
    Completion,
    Job,
    JobError,
    Message,
    validation_message,
)

if TYPE_CHECKING:
    from celery import Celery, Signature
    from celery.result import AsyncResult

TASK_NAME = "tokenrelay.generate"
DEFAULT_QUEUE = "tokenrelay"
# The job fields a task's kwargs may carry: a Job without `id` (the Celery task id is the job id).
JOB_KWARGS = ("prompt", "messages", "prompt_token_ids", "params", "priority", "deadline_ms", "result_ttl_s",
              "lane")
# No pickle anywhere: a broker message must never be able to run code in the worker.
JSON_ONLY: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
}


class GenerationFailed(JobFailed):
    """A tokenrelay.generate task that ended with an error event. Its args are (code, message, job_id),
    all JSON values, so Celery's JSON result backend rebuilds it in the producer with the fields intact."""

    def __init__(self, code: str, message: str, job_id: str | None = None) -> None:
        super().__init__(code, message, job_id)
        self.args = (code, message, job_id)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def celery_config(broker_url: str, result_backend: str | None = None) -> dict[str, Any]:
    """Settings for a producer's Celery app (`Celery(config_source=...)` or `app.conf.update(...)`):
    JSON only, results in `result_backend` (default: the broker)."""
    return {"broker_url": broker_url, "result_backend": result_backend or broker_url,
            "broker_connection_retry_on_startup": True, **JSON_ONLY}


def job_kwargs(prompt: str | None = None, *, messages: Sequence[Mapping[str, Any] | Message] | None = None,
               prompt_token_ids: Sequence[int] | None = None, priority: int = 0,
               deadline_ms: int | None = None, result_ttl_s: int | None = None, lane: str | None = None,
               **params: Any) -> dict[str, Any]:
    """The task kwargs of one job, validated by the wire schema (JobError naming the bad field)."""
    if isinstance(params.get("stop"), str):  # as Client.submit: one stop string is a list of one
        params["stop"] = [params["stop"]]
    fields: dict[str, Any] = {"prompt": prompt, "priority": priority, "params": params,
                              "deadline_ms": deadline_ms, "result_ttl_s": result_ttl_s, "lane": lane,
                              "messages": None if messages is None else [
                                  m.model_dump() if isinstance(m, Message) else dict(m) for m in messages],
                              "prompt_token_ids": None if prompt_token_ids is None else list(prompt_token_ids)}
    return job_from_kwargs({k: v for k, v in fields.items() if v is not None}).model_dump(
        mode="json", exclude_none=True, exclude={"id"})


def job_from_kwargs(kwargs: Mapping[str, Any], job_id: str | None = None) -> Job:
    """Validate task kwargs into a Job (with `job_id` as its id). Raises JobError (a ValueError)."""
    extra = sorted(set(kwargs) - set(JOB_KWARGS))
    if extra:
        raise JobError("invalid_request", f"unknown task kwargs {extra}: the kwargs are the job fields "
                       f"{list(JOB_KWARGS)} (the Celery task id is the job id)", job_id)
    try:
        return Job.model_validate({**kwargs, "id": job_id})
    except ValidationError as exc:
        raise JobError("invalid_request", validation_message(exc), job_id) from None


def generate_signature(app: Celery, prompt: str | None = None, *,
                       messages: Sequence[Mapping[str, Any] | Message] | None = None,
                       prompt_token_ids: Sequence[int] | None = None, priority: int = 0,
                       deadline_ms: int | None = None, result_ttl_s: int | None = None, lane: str | None = None,
                       job_id: str | None = None, queue: str = DEFAULT_QUEUE, **params: Any) -> Signature:
    """A validated `tokenrelay.generate` signature (for chains, groups, or `.apply_async()`).
    Extra keyword arguments are sampling params; `job_id` becomes the task id (default: Celery's uuid)."""
    kwargs = job_kwargs(prompt, messages=messages, prompt_token_ids=prompt_token_ids, priority=priority,
                        deadline_ms=deadline_ms, result_ttl_s=result_ttl_s, lane=lane, **params)
    return app.signature(TASK_NAME, kwargs=kwargs, **_options(queue, job_id))


def send_generate(app: Celery, prompt: str | None = None, *,
                  messages: Sequence[Mapping[str, Any] | Message] | None = None,
                  prompt_token_ids: Sequence[int] | None = None, priority: int = 0,
                  deadline_ms: int | None = None, result_ttl_s: int | None = None, lane: str | None = None,
                  job_id: str | None = None, queue: str = DEFAULT_QUEUE, **params: Any) -> AsyncResult:
    """Validate and send one job as a `tokenrelay.generate` task. `AsyncResult.get()` returns the
    completion dict {"text", "token_ids", "finish_reason", "usage"} (see `completion_from_result`) or
    raises GenerationFailed; `Client.stream(result.id)` yields its tokens as they are generated."""
    kwargs = job_kwargs(prompt, messages=messages, prompt_token_ids=prompt_token_ids, priority=priority,
                        deadline_ms=deadline_ms, result_ttl_s=result_ttl_s, lane=lane, **params)
    return app.send_task(TASK_NAME, kwargs=kwargs, **_options(queue, job_id))


def completion_from_result(value: Mapping[str, Any]) -> Completion:
    """The typed Completion of a task's return value (`AsyncResult.get()`)."""
    return Completion.model_validate(value)


def _options(queue: str, job_id: str | None) -> dict[str, Any]:
    # The serializer is pinned per message: a producer app left on another default must not send pickle.
    options: dict[str, Any] = {"queue": queue, "serializer": "json"}
    if job_id is not None:
        if len(job_id) > MAX_JOB_ID_LEN or not re.match(JOB_ID_PATTERN, job_id):
            raise JobError("invalid_request", f"job_id {job_id!r} must match {JOB_ID_PATTERN} "
                           f"(at most {MAX_JOB_ID_LEN} characters)")
        options["task_id"] = job_id
    return options
