"""MPEngine: the EngineCore's busy loop in a child process (the engine core); tokenizing, detokenizing,
stop strings and the output callbacks stay in this process (EngineFrontend).

Why a process: in one process the step loop shares the GIL with everything around it (the worker's
asyncio loop, JSON, Redis scripts, per-token detokenization of hundreds of streams), and every
millisecond the loop waits for the GIL is a millisecond the GPU idles. The core process does only what
the offline engine's core does (schedule, run the model, sample, append tokens) and ships token ids
once per step; this process turns them into text and hands them on. When it falls behind, the steps
waiting in the pipe are processed together, so it decodes and delivers once per request for several.

Wire between the processes: two one-way pipes of msgpack-encoded msgspec structs (engine/core.py,
engine/request.py; no pickle anywhere, docs/security.md). Parent -> core: EngineCoreRequest |
AbortRequests | Shutdown. Core -> parent: Ready, then EngineCoreOutputs per busy-loop turn, or Failed."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing as mp
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection

import msgspec

from engine.config import EngineConfig
from engine.core import AbortRequests, Command, EngineCore, EngineCoreOutputs, Shutdown
from engine.core_client import EngineFrontend
from engine.distributed import disable_nvlink_multicast
from engine.input_processor import InputProcessor, resolve_config_model
from engine.model_files import ModelFiles
from engine.request import EngineCoreRequest, Request
from engine.stats import EngineStats

logger = logging.getLogger("tokenrelay.engine")

IDLE_POLL_S = 0.5  # how long the idle core waits for a command before looking again
STARTUP_TIMEOUT_S = 1800.0  # loading and graph capture of a large checkpoint


class Ready(msgspec.Struct, array_like=True, tag=4):
    stats: EngineStats


class Failed(msgspec.Struct, array_like=True, tag=5):
    message: str
    is_config_error: bool  # raised as ValueError where the engine is built (a bad knob or checkpoint)


_COMMANDS = msgspec.msgpack.Decoder(EngineCoreRequest | AbortRequests | Shutdown)
_REPLIES = msgspec.msgpack.Decoder(EngineCoreOutputs | Ready | Failed)


# ---- the core process -----------------------------------------------------------------------------
class _PipeChannel:
    """The busy loop's ends of the two pipes."""

    def __init__(self, commands: Connection, outputs: Connection) -> None:
        self.commands = commands
        self.outputs = outputs
        self.encoder = msgspec.msgpack.Encoder()

    def receive(self, block: bool) -> list[Command]:
        received: list[Command] = []
        timeout_s = IDLE_POLL_S if block else 0.0
        while self.commands.poll(timeout_s):
            timeout_s = 0.0
            command = _COMMANDS.decode(self.commands.recv_bytes())
            received.append(command.to_request() if isinstance(command, EngineCoreRequest) else command)
        return received

    def send(self, outputs: EngineCoreOutputs) -> None:
        self.outputs.send_bytes(self.encoder.encode(outputs))


def _core_main(config: EngineConfig, files: ModelFiles, commands: Connection, outputs: Connection,
               log_level: int) -> None:
    # The parent decides when the core stops (Shutdown, or its end of the pipe closing): a Ctrl-C that
    # reaches the whole process group must not kill the core in the middle of the parent's drain.
    # SIGTERM keeps its default: it is how multiprocessing ends a daemon child whose parent exits
    # without shutdown(), and a SIGTERM sent to the whole group (systemd) ends the core; the parent then
    # hands its jobs back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    disable_nvlink_multicast()  # before anything in this process touches NCCL
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 <core pid>`: its stacks
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    encoder = msgspec.msgpack.Encoder()
    try:
        core = EngineCore(config, files)
    except BaseException as exc:  # report it: the parent raises it where the engine was constructed
        with contextlib.suppress(OSError):
            outputs.send_bytes(encoder.encode(Failed(f"{exc}", isinstance(exc, ValueError))))
        return
    try:
        outputs.send_bytes(encoder.encode(Ready(core.stats())))
        core.run_busy_loop(_PipeChannel(commands, outputs))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.warning("engine core: the parent process is gone; exiting")
    except BaseException as exc:
        logger.exception("engine core died")
        with contextlib.suppress(OSError):
            outputs.send_bytes(encoder.encode(Failed(repr(exc), False)))
    finally:
        core.shutdown()


# ---- this process ---------------------------------------------------------------------------------
class MPEngine(EngineFrontend):
    def __init__(self, config: EngineConfig) -> None:
        files = resolve_config_model(config)
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA state
        commands_r, self._commands = ctx.Pipe(duplex=False)
        self._outputs, outputs_w = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_core_main, name="tokenrelay-engine-core", daemon=True,
                                    args=(config, files, commands_r, outputs_w,
                                          logging.getLogger().getEffectiveLevel()))
        self._process.start()
        commands_r.close()
        outputs_w.close()
        # The core starts first: its imports and model load (most of start-up) then overlap this
        # process's config and tokenizer load instead of following them.
        try:
            inputs = InputProcessor(config, files)
        except BaseException:
            self._kill_core()
            raise
        self._encoder = msgspec.msgpack.Encoder()
        self._send_lock = threading.Lock()
        super().__init__(config, inputs, self._wait_ready())
        logger.info("engine core ready pid=%s", self._process.pid)
        self._inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def _wait_ready(self) -> EngineStats:
        """Block until the core has loaded the model: its stats, or its construction error re-raised."""
        try:
            if not self._outputs.poll(STARTUP_TIMEOUT_S):
                raise RuntimeError(f"the engine core did not start within {STARTUP_TIMEOUT_S:.0f}s")
            message = _REPLIES.decode(self._outputs.recv_bytes())
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine core process exited during startup "
                               f"(exit code {self._process.exitcode})") from None
        except BaseException:
            self._kill_core()
            raise
        if isinstance(message, Failed):
            self._process.join(5)
            raise (ValueError if message.is_config_error else RuntimeError)(message.message)
        assert isinstance(message, Ready), f"the engine core's first message was {message!r}"
        return message.stats

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        self._threads = [threading.Thread(target=self._read, name="tokenrelay-core-reader", daemon=True),
                         threading.Thread(target=self._dispatch_loop, name="tokenrelay-core-outputs",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._send_message(Shutdown())
        self._process.join(timeout_s)
        if self._process.is_alive():
            logger.warning("the engine core did not stop in %.0fs: killing it", timeout_s)
            self._kill_core()
        self._inbox.put(None)
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = []
        with contextlib.suppress(OSError):
            self._commands.close()

    def _kill_core(self) -> None:
        self._process.kill()
        self._process.join(5)

    @property
    def is_running(self) -> bool:
        return self._process.is_alive() and bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def core_pid(self) -> int | None:
        return self._process.pid

    # ---- commands ------------------------------------------------------------------------------
    def _send(self, command: Request | AbortRequests) -> None:
        with contextlib.suppress(OSError):  # the core is gone: the reader fails every open request
            self._send_message(EngineCoreRequest.from_request(command) if isinstance(command, Request) else command)

    def _send_message(self, message: EngineCoreRequest | AbortRequests | Shutdown) -> None:
        data = self._encoder.encode(message)
        with self._send_lock:
            self._commands.send_bytes(data)

    # ---- outputs -------------------------------------------------------------------------------
    def _read(self) -> None:
        """Move each step's bytes off the pipe at once, so the core never blocks on a full pipe while
        the output thread decodes."""
        try:
            while True:
                self._inbox.put(self._outputs.recv_bytes())
        except (EOFError, OSError):
            if not self._stopping.is_set() and self.error is None:
                self._process.join(5)
                self.error = RuntimeError(f"the engine core process exited (exit code {self._process.exitcode})")
                logger.error("%s", self.error)
        finally:
            self._inbox.put(None)

    def _dispatch_loop(self) -> None:
        while True:
            batch = [self._inbox.get()]
            while True:  # everything that queued up while the last batch was delivered
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._deliver(batch)
            except Exception as exc:  # outputs were lost: say so to every open request, never stay silent
                logger.exception("engine core outputs: delivering %d messages failed", len(batch))
                self.error = self.error or RuntimeError(f"engine core outputs were lost: {exc!r}")
                self._fail_all(f"{self.error}")
            if None in batch:  # the pipe closed
                if not self._stopping.is_set():
                    self._fail_all(f"{self.error or 'the engine core process exited'}")
                return

    def _deliver(self, batch: list[bytes | None]) -> None:
        steps: list[EngineCoreOutputs] = []
        for raw in batch:
            if raw is None:
                continue
            message = _REPLIES.decode(raw)
            if isinstance(message, EngineCoreOutputs):
                steps.append(message)
            elif isinstance(message, Failed):
                self.error = RuntimeError(f"the engine core died: {message.message}")
                logger.error("%s", self.error)
        if steps:
            self._on_core_outputs(steps)
