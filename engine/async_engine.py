"""AsyncEngine: the EngineCore's busy loop in a thread of this process, fed through a thread-safe inbox.

The loop thread is the only one that touches the scheduler and the GPU; it also turns each step's
outputs into text and calls the callbacks (EngineFrontend). Callers submit, abort and read stats from
any thread, and `stream()` bridges outputs into asyncio. engine/mp_engine.py is the same frontend with
the loop in a child process."""

from __future__ import annotations

import logging
import queue
import threading

from engine.config import EngineConfig
from engine.core import AbortRequests, Command, EngineCore, EngineCoreOutputs, Shutdown
from engine.core_client import EngineFrontend, OutputCallback
from engine.hf_config import load_hf_config
from engine.input_processor import InputProcessor, resolve_config_model
from engine.request import Request

logger = logging.getLogger("tokenrelay.engine")

__all__ = ["AsyncEngine", "EngineFrontend", "OutputCallback"]

IDLE_POLL_S = 0.5  # how long the idle loop waits for a command before looking again


class _QueueChannel:
    """The busy loop's side of the inbox; outputs go straight to the frontend, in the loop's thread."""

    def __init__(self, inbox: queue.SimpleQueue[Command], frontend: AsyncEngine) -> None:
        self.inbox = inbox
        self.frontend = frontend

    def receive(self, block: bool) -> list[Command]:
        try:
            commands = [self.inbox.get(timeout=IDLE_POLL_S) if block else self.inbox.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                commands.append(self.inbox.get_nowait())
            except queue.Empty:
                return commands

    def send(self, outputs: EngineCoreOutputs) -> None:
        self.frontend._on_core_outputs((outputs,))


class AsyncEngine(EngineFrontend):
    def __init__(self, config: EngineConfig) -> None:
        files = resolve_config_model(config)
        hf_config = load_hf_config(files)
        inputs = InputProcessor(config, files, hf_config)
        self.core = EngineCore(config, files, hf_config)
        super().__init__(config, inputs, self.core.stats())
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="tokenrelay-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._inbox.put(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.core.shutdown()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _send(self, command: Request | AbortRequests) -> None:
        self._inbox.put(command)

    def _run(self) -> None:
        try:
            self.core.run_busy_loop(_QueueChannel(self._inbox, self))
        except BaseException as exc:  # the loop must not die silently: fail every open request
            logger.exception("engine loop died")
            self.error = exc
            self._fail_all(f"the engine loop died: {exc!r}")
