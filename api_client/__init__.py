"""What producers import: the wire schema, Redis key names, Client / AsyncClient.

Depends on redis and pydantic only (never torch), so a web backend can install it without the engine."""

from __future__ import annotations

from api_client.async_client import AsyncClient
from api_client.client import Client, JobFailed, JobLost, Submitted
from api_client.keys import EVENT_FIELD, JOB_FIELD, PROTOCOL_VERSION, Keys
from api_client.schema import (
    Completion,
    DoneEvent,
    ErrorEvent,
    Event,
    Job,
    JobError,
    Message,
    Params,
    TokenEvent,
    Usage,
    dump_event,
    parse_event,
    parse_job,
)
from api_client.status import JobState, JobStatus

__all__ = [
    "EVENT_FIELD",
    "JOB_FIELD",
    "PROTOCOL_VERSION",
    "AsyncClient",
    "Client",
    "Completion",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "Job",
    "JobError",
    "JobFailed",
    "JobLost",
    "JobState",
    "JobStatus",
    "Keys",
    "Message",
    "Params",
    "Submitted",
    "TokenEvent",
    "Usage",
    "dump_event",
    "parse_event",
    "parse_job",
]
