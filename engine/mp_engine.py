"""MPEngine: the LLMEngine step loop in a child process (the engine core); tokenizing, detokenizing and
the output callbacks stay in this process.

Why a process: in one process the step loop shares the GIL with everything around it (the worker's
asyncio loop, JSON, Redis scripts, per-token detokenization of hundreds of streams), and every
millisecond the loop waits for the GIL is a millisecond the GPU idles. The core process does only what
the offline engine does (schedule, run the model, sample, append tokens) and ships token ids once per
step; this process turns them into text and hands them on. When it falls behind, the steps waiting
in the pipe are merged per request, so it decodes and delivers once per request for several steps.

Requests with stop strings are the exception: the core decodes those itself, because the stop match
decides when the request ends and frees its blocks.

Wire between the processes: two one-way pipes of JSON arrays (plain values only: no pickle anywhere,
docs/security.md). Parent -> core: ["add", request] | ["abort", id] | ["stop"]. Core -> parent:
["ready", stats] | ["step", outputs, rejects, stats, num_added] | ["failed", message, is_config_error]."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import logging
import multiprocessing as mp
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from engine.async_engine import EngineFrontend, OutputCallback, error_output
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.input_processor import InputProcessor
from engine.model_files import ModelFiles
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

logger = logging.getLogger("tokenrelay.engine")

IDLE_POLL_S = 0.5  # how long the idle core waits for a command before checking again
STARTUP_TIMEOUT_S = 1800.0  # loading and graph capture of a large checkpoint

def _pack(o: RequestOutput) -> list[Any]:
    """A RequestOutput as a JSON array (256 a step: arrays encode faster than objects)."""
    return [o.request_id, o.token_ids, o.text, o.finish_reason, o.logprobs, o.index, o.num_prompt_tokens,
            o.num_cached_tokens, o.extra]


def _unpack(p: list[Any]) -> RequestOutput:
    out = RequestOutput(*p)
    out.logprobs = _int_keys(p[4])
    return out


def _int_keys(logprobs: list[dict[str, float]] | None) -> list[dict[int, float]] | None:
    # JSON object keys are strings; token ids are ints.
    return None if logprobs is None else [{int(k): v for k, v in lp.items()} for lp in logprobs]


def _pack_request(r: Request) -> dict[str, Any]:
    return {"request_id": r.request_id, "prompt_token_ids": r.prompt_token_ids,
            "sampling_params": dataclasses.asdict(r.sampling_params), "eos_token_ids": sorted(r.eos_token_ids),
            "priority": r.priority, "seed": r.seed, "output_token_ids": r.output_token_ids}


def _unpack_request(d: dict[str, Any]) -> Request:
    return Request(**{**d, "sampling_params": SamplingParams(**d["sampling_params"]),
                      "eos_token_ids": frozenset(d["eos_token_ids"])})


def _dumps(message: list[Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _loads(data: bytes) -> list[Any]:
    message: list[Any] = json.loads(data)
    return message


# ---- the core process -----------------------------------------------------------------------------
def _core_main(config: EngineConfig, files: ModelFiles, commands: Connection, outputs: Connection,
               log_level: int) -> None:
    # The parent decides when the core stops (a "stop" command, or its end of the pipe closing): a
    # Ctrl-C that reaches the whole process group must not kill the core in the middle of the parent's
    # drain. SIGTERM keeps its default: it is how multiprocessing ends a daemon child whose parent exits
    # without shutdown(), and a SIGTERM sent to the whole group (systemd) ends the core; the parent then
    # hands its jobs back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 <core pid>`: its stacks
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(config, files)
    except BaseException as exc:  # report it: the parent raises it where the engine was constructed
        with contextlib.suppress(OSError):
            outputs.send_bytes(_dumps(["failed", f"{exc}", isinstance(exc, ValueError)]))
        return
    try:
        outputs.send_bytes(_dumps(["ready", dataclasses.asdict(engine.stats())]))
        _serve(engine, commands, outputs)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.warning("engine core: the parent process is gone; exiting")
    except BaseException as exc:
        logger.exception("engine core died")
        with contextlib.suppress(OSError):
            outputs.send_bytes(_dumps(["failed", repr(exc), False]))


def _serve(engine: Any, commands: Connection, outputs: Connection) -> None:
    num_added = 0
    while True:
        if not engine.has_unfinished() and not commands.poll(IDLE_POLL_S):
            continue
        rejects: list[tuple[str, str]] = []
        while commands.poll(0):
            command = _loads(commands.recv_bytes())
            if command[0] == "add":
                request = _unpack_request(command[1])
                num_added += 1
                try:
                    engine.add(request, detokenize=False)
                except ValueError as exc:  # e.g. a duplicate id: only this request fails
                    rejects.append((request.request_id, str(exc)))
            elif command[0] == "abort":
                engine.abort(command[1])
            else:
                return
        stepped = [_pack(o) for o in engine.step()] if engine.has_unfinished() else []
        outputs.send_bytes(_dumps(["step", stepped, rejects, dataclasses.asdict(engine.stats()), num_added]))


# ---- this process ---------------------------------------------------------------------------------
@dataclass
class _Live:
    on_output: OutputCallback
    detokenizer: IncrementalDetokenizer | None  # None: the core decodes (stop strings)


class MPEngine(EngineFrontend):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.inputs = InputProcessor(config)
        self.max_model_len = self.inputs.max_model_len
        self.tokenizer = self.inputs.tokenizer
        self.eos_token_ids = self.inputs.eos_token_ids
        self.error: BaseException | None = None
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA state
        commands_r, self._commands = ctx.Pipe(duplex=False)
        self._outputs, outputs_w = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_core_main, name="tokenrelay-engine-core", daemon=True,
                                    args=(config, self.inputs.files, commands_r, outputs_w,
                                          logging.getLogger().getEffectiveLevel()))
        self._process.start()
        commands_r.close()
        outputs_w.close()
        self._send_lock = threading.Lock()
        self._stats = self._wait_ready()
        logger.info("engine core ready pid=%s", self._process.pid)
        self._live: dict[str, _Live] = {}
        self._live_lock = threading.Lock()
        self._num_submitted = 0
        self._num_added = 0  # as last reported by the core
        self._inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def _wait_ready(self) -> EngineStats:
        """Block until the core has loaded the model: its stats, or its construction error re-raised."""
        try:
            if not self._outputs.poll(STARTUP_TIMEOUT_S):
                raise RuntimeError(f"the engine core did not start within {STARTUP_TIMEOUT_S:.0f}s")
            message = _loads(self._outputs.recv_bytes())
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine core process exited during startup "
                               f"(exit code {self._process.exitcode})") from None
        except BaseException:
            self._kill_core()
            raise
        if message[0] == "failed":
            self._process.join(5)
            raise (ValueError if message[2] else RuntimeError)(message[1])
        return EngineStats(**message[1])

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
            self._send(["stop"])
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

    # ---- requests ------------------------------------------------------------------------------
    def _enqueue(self, request: Request, on_output: OutputCallback) -> None:
        request_id = request.request_id
        detokenizer = None
        if not request.sampling_params.stop:
            with self.inputs.tokenizer_lock:
                # Resumed tokens count as already streamed, as in the core's own detokenizer.
                detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                     initial_output_token_ids=request.output_token_ids)
        with self._live_lock:
            if request_id in self._live:
                duplicate = True
            else:
                duplicate = False
                self._live[request_id] = _Live(on_output, detokenizer)
                self._num_submitted += 1
        if duplicate:
            on_output(error_output(request_id, f"request {request_id!r} is already running"))
            return
        self._send(["add", _pack_request(request)])

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(OSError):
            self._send(["abort", request_id])

    def _send(self, command: list[Any]) -> None:
        data = _dumps(command)
        with self._send_lock:
            self._commands.send_bytes(data)

    # ---- load ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self._stats  # replaced whole by the output thread: reading it needs no lock

    def num_pending(self) -> int:
        with self._live_lock:
            return max(0, self._num_submitted - self._num_added)

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
            messages = [_loads(raw) for raw in batch if raw is not None]
            try:
                self._deliver(messages)
            except Exception:  # a bug here must not silence every request
                logger.exception("engine core outputs: delivering %d messages failed", len(messages))
            if len(messages) != len(batch):  # the pipe closed
                if not self._stopping.is_set():
                    self._fail_all()
                return

    def _deliver(self, messages: list[list[Any]]) -> None:
        merged: list[RequestOutput] = []
        open_by_id: dict[str, RequestOutput] = {}
        for message in messages:
            if message[0] == "failed":
                self.error = RuntimeError(f"the engine core died: {message[1]}")
                logger.error("%s", self.error)
                continue
            _, packed, rejects, stats, num_added = message
            for p in packed:
                out = open_by_id.get(p[0])
                if out is None:
                    out = _unpack(p)
                    merged.append(out)
                    if not out.finished:
                        open_by_id[out.request_id] = out
                    continue
                out.token_ids = out.token_ids + p[1]  # a fresh list: never grow the core's copy
                out.text += p[2]
                if p[4] is not None:
                    out.logprobs = [*(out.logprobs or []), *(_int_keys(p[4]) or [])]
                out.finish_reason, out.num_cached_tokens, out.extra = p[3], p[7], p[8]
                if out.finished:
                    del open_by_id[out.request_id]
            merged.extend(error_output(req_id, reason) for req_id, reason in rejects)
            self._stats = EngineStats(**stats)
            with self._live_lock:
                self._num_added = num_added
        for out in merged:
            self._deliver_one(out)

    def _deliver_one(self, out: RequestOutput) -> None:
        with self._live_lock:
            live = self._live.pop(out.request_id, None) if out.finished else self._live.get(out.request_id)
        if live is None:
            return
        if live.detokenizer is not None and not out.extra.get("error"):
            with self.inputs.tokenizer_lock:
                text = live.detokenizer.update(out.token_ids) if out.token_ids else ""
                if out.finish_reason in ("stop", "length"):
                    text += live.detokenizer.flush()
            out.text = text
        try:
            live.on_output(out)
        except Exception:  # a broken consumer must not stop delivery for everyone else
            logger.exception("output callback failed for request=%s", out.request_id)

    def _fail_all(self) -> None:
        with self._live_lock:
            lives, self._live = self._live, {}
        for req_id, live in lives.items():
            with contextlib.suppress(Exception):
                live.on_output(error_output(req_id, ""))
