"""The Celery door: task `tokenrelay.generate`, a thin shim over the stream path, and an embedded Celery
worker (threads pool) that serves it inside the GPU worker process.

The shim needs only Redis: it enqueues the task's job on {p}:jobs under the task id, waits for the job's
final event on {p}:result:{task_id} and returns the completion. Any Celery worker can run it:
`celery -A worker.celery_door worker -Q tokenrelay -P threads -c 64` (settings from TOKENRELAY_*)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from celery import Celery
from celery.app import trace
from celery.exceptions import Reject
from celery.signals import worker_shutting_down
from celery.worker import WorkController
from celery.worker import state as worker_state

from api_client.celery import JSON_ONLY, TASK_NAME, GenerationFailed, job_from_kwargs
from api_client.client import DEFAULT_REDIS_URL, event_from_fields, stream_entries
from api_client.connection import RETRYABLE_ERRORS, cluster_from_env, connect
from api_client.keys import DEFAULT_LANE, DEFAULT_PREFIX, EVENT_FIELD, Keys, submit_keys
from api_client.schema import Completion, DoneEvent, ErrorEvent, JobError, dump_event
from api_client.status import SUBMIT_SCRIPT, marker_ttl_s

if TYPE_CHECKING:
    from celery import Task

logger = logging.getLogger("tokenrelay.celery_door")

BLOCK_MS = 1000  # XREAD BLOCK per call: the stop flag is checked between calls
SOCKET_TIMEOUT_S = 10.0
REDIS_DOWN_LIMIT_S = 60.0  # Redis unreachable this long: hand the task back to the broker
START_TIMEOUT_S = 30.0

# KEYS: result. ARGV: event_json, ttl_s. The error event of a task whose kwargs are not a valid job, so
# `Client.stream(task_id)` ends too; written only into an empty stream (exactly one final event).
_FAIL = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('XADD', KEYS[1], '*', '{EVENT_FIELD}', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def marker_key(keys: Keys, job_id: str) -> str:
    """The job marker the door writes when it enqueues job `job_id` (the one Client.submit writes: a
    redelivered task only waits, and the same job never sits in the queue twice)."""
    return keys.job(job_id)


@dataclass(frozen=True)
class DoorConfig:
    """Where the shim finds the stream path (the broker may be another Redis)."""

    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = DEFAULT_PREFIX
    result_ttl_s: int = 3600  # as the worker's result_ttl_s: the marker lives as long as a result stream
    redis_cluster: bool = False  # the stream path's Redis is a Redis Cluster (the broker is Celery's own)
    queue_shards: int = 1  # as the workers' queue_shards

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix, num_shards=self.queue_shards, cluster=self.redis_cluster)

    @classmethod
    def from_env(cls) -> DoorConfig:
        """TOKENRELAY_REDIS_URL, TOKENRELAY_PREFIX, TOKENRELAY_RESULT_TTL_S, TOKENRELAY_REDIS_CLUSTER and
        TOKENRELAY_QUEUE_SHARDS (for standalone Celery workers)."""
        env = os.environ
        return cls(redis_url=env.get("TOKENRELAY_REDIS_URL", DEFAULT_REDIS_URL),
                   prefix=env.get("TOKENRELAY_PREFIX", DEFAULT_PREFIX),
                   result_ttl_s=int(env.get("TOKENRELAY_RESULT_TTL_S", "3600")),
                   redis_cluster=cluster_from_env(dict(env)),
                   queue_shards=int(env.get("TOKENRELAY_QUEUE_SHARDS", "1")))


class Shim:
    """The body of tokenrelay.generate: enqueue on the stream path, wait for the final event."""

    def __init__(self, config: DoorConfig) -> None:
        self.config = config
        self.keys = config.keys
        # One thread-safe client (a connection pool) for every task thread.
        self.redis = connect(config.redis_url, cluster=config.redis_cluster, socket_timeout=SOCKET_TIMEOUT_S,
                             socket_connect_timeout=SOCKET_TIMEOUT_S)
        self._enqueue = self.redis.register_script(SUBMIT_SCRIPT)
        self._fail = self.redis.register_script(_FAIL)
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Tasks still waiting hand their message back to the broker (another door takes them over)."""
        self._stopping.set()

    def close(self) -> None:
        self.redis.close()

    def run(self, job_id: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            job = job_from_kwargs(kwargs, job_id)
        except JobError as exc:
            event = ErrorEvent(code=exc.code, message=exc.message)
            with _requeue_when_redis_is_down(job_id):
                self._fail(keys=[self.keys.result(job_id)], args=[dump_event(event), self.config.result_ttl_s])
            logger.info("job=%s event=celery_rejected code=%s message=%r", job_id, exc.code, exc.message)
            raise GenerationFailed(exc.code, exc.message, job_id) from None
        ttl_s = job.result_ttl_s or self.config.result_ttl_s
        with _requeue_when_redis_is_down(job_id):
            reply = self._enqueue(keys=submit_keys(self.keys, job_id, job.lane or DEFAULT_LANE),
                                  args=[job.to_json(), marker_ttl_s(ttl_s)])
        is_new = int(reply[0]) == 1
        logger.info("job=%s event=celery_%s", job_id, "enqueued" if is_new else "rejoined")
        final = self._wait_final(job_id)
        if isinstance(final, ErrorEvent):
            raise GenerationFailed(final.code, final.message, job_id)
        return Completion.from_done(final).model_dump(mode="json")

    def _wait_final(self, job_id: str) -> DoneEvent | ErrorEvent:
        key, last_id, down_since = self.keys.result(job_id), "0-0", None
        while True:
            if self._stopping.is_set():
                raise Reject("the Celery door is stopping: the task goes back to the broker", requeue=True)
            try:
                reply: Any = self.redis.xread({key: last_id}, count=256, block=BLOCK_MS)
            except RETRYABLE_ERRORS as exc:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > REDIS_DOWN_LIMIT_S:
                    raise Reject(f"Redis unreachable for {REDIS_DOWN_LIMIT_S:.0f} s: {exc}", requeue=True) from None
                logger.warning("job=%s event=redis_unreachable error=%s", job_id, exc)
                time.sleep(1.0)
                continue
            down_since = None
            for entry_id, fields in stream_entries(reply):
                last_id = entry_id
                event = event_from_fields(fields)
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    return event


@contextmanager
def _requeue_when_redis_is_down(job_id: str) -> Iterator[None]:
    # A failed task would be acked and lost: hand it back to the broker instead, after a pause so a
    # Redis that stays down is not hammered by the same task.
    try:
        yield
    except RETRYABLE_ERRORS as exc:
        logger.warning("job=%s event=redis_unreachable error=%s: task handed back", job_id, exc)
        time.sleep(1.0)
        raise Reject(f"Redis unreachable: {exc}", requeue=True) from None


def register_generate_task(app: Celery, config: DoorConfig) -> Task:
    """Add tokenrelay.generate to `app` (an app of your own works too: it must accept JSON)."""
    shim = Shim(config)

    # throws: an error event is an expected outcome, logged without a traceback.
    # shared=False: each app keeps its own task (and shim), not Celery's process-wide shared one.
    @app.task(name=TASK_NAME, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True,
              serializer="json", throws=(GenerationFailed,))
    def generate(self: Task, **kwargs: Any) -> dict[str, Any]:
        return shim.run(self.request.id, kwargs)

    generate.shim = shim  # type: ignore[attr-defined]  # the door stops it
    # A standalone `celery worker` shutting down: waiting tasks go back to the broker at once instead
    # of holding the shutdown until their jobs finish.
    worker_shutting_down.connect(lambda **_: shim.stop(), weak=False)
    return generate


def make_celery_app(config: DoorConfig | None = None, broker_url: str | None = None,
                    result_backend: str | None = None) -> Celery:
    """A Celery app serving tokenrelay.generate: JSON only, late acks, one prefetched task per thread."""
    config = config or DoorConfig.from_env()
    broker_url = broker_url or os.environ.get("TOKENRELAY_CELERY_BROKER_URL") or config.redis_url
    app = Celery("tokenrelay", broker=broker_url, backend=result_backend or broker_url, set_as_current=False)
    app.conf.update(JSON_ONLY, task_acks_late=True, task_reject_on_worker_lost=True,
                    worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False)
    register_generate_task(app, config)
    return app


class DoorSettings(Protocol):
    """What start_celery_door reads (WorkerSettings has these fields)."""

    redis_url: str
    prefix: str
    result_ttl_s: int
    redis_cluster: bool
    queue_shards: int
    consumer: str
    celery_queue: str | None
    celery_broker_url: str | None
    celery_concurrency: int


class _Controller(WorkController):
    """A Celery worker without signal handlers (the host process owns signals) that says when it is up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.ready.set()


class CeleryDoor:
    """A running embedded Celery worker (threads pool) serving tokenrelay.generate from one queue."""

    def __init__(self, app: Celery, queue: str, concurrency: int, hostname: str) -> None:
        if concurrency < 1:
            raise ValueError(f"celery concurrency must be >= 1, got {concurrency}")
        self.app = app
        self.queue = queue
        self.shim: Shim = app.tasks[TASK_NAME].shim
        # What `celery worker` does first: pool threads trace tasks through the process's current app
        # (without this they would find the default app and store results in its disabled backend).
        trace.setup_worker_optimizations(app, hostname)
        self._controller = _Controller(app=app, hostname=hostname, pool_cls="threads", concurrency=concurrency,
                                       queues=[queue], loglevel="WARNING", ready_callback=None,
                                       without_heartbeat=True, without_mingle=True, without_gossip=True)
        self._thread = threading.Thread(target=self._controller.start, name="celery-door", daemon=True)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> CeleryDoor:
        self._thread.start()
        if not self._controller.ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"the Celery door did not connect to its broker within {timeout_s} s "
                               "(is TOKENRELAY_CELERY_BROKER_URL / TOKENRELAY_REDIS_URL reachable?)")
        logger.info("celery door: serving %s on queue %r (threads=%d)", TASK_NAME, self.queue,
                    self._controller.concurrency)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop consuming; tasks still waiting go back to the broker for another door; then join."""
        self.shim.stop()
        worker_state.should_stop = 0  # what Celery's own embedded worker uses: a warm shutdown
        self._thread.join(timeout_s)
        worker_state.should_stop = None
        trace.reset_worker_optimizations(self.app)
        self.shim.close()
        if self._thread.is_alive():
            logger.warning("celery door: worker thread still running after %.0f s", timeout_s)


def start_celery_door(settings: DoorSettings) -> CeleryDoor | None:
    """Serve tokenrelay.generate from settings.celery_queue inside this process; None when it is unset."""
    if not settings.celery_queue:
        return None
    config = DoorConfig(redis_url=settings.redis_url, prefix=settings.prefix, result_ttl_s=settings.result_ttl_s,
                        redis_cluster=settings.redis_cluster, queue_shards=settings.queue_shards)
    app = make_celery_app(config, broker_url=settings.celery_broker_url or settings.redis_url)
    door = CeleryDoor(app, settings.celery_queue, settings.celery_concurrency,
                      hostname=f"tokenrelay-door@{settings.consumer}")
    return door.start()


app: Celery  # `celery -A worker.celery_door`: made from the environment on first access (below)


def __getattr__(name: str) -> Any:
    # Built on demand, so importing this module (the GPU worker does) creates no app and reads no env.
    if name == "app":
        globals()["app"] = made = make_celery_app()
        return made
    raise AttributeError(name)
