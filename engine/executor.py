"""MultiprocExecutor: tensor parallelism's ranks behind the ModelRunner's own interface. Rank 0 (the driver)
is a ModelRunner in the engine core's process; ranks 1..N-1 are one spawned process each, every one with
its model shard and its KV cache of its heads. The scheduler and the block pool stay single, in the core.

Each call the core makes on its runner (launch a step, wait for one, size / allocate the KV cache, capture
graphs) goes to every rank over its pipe, msgpack-encoded (no pickle: docs/security.md), in the same order,
so the ranks meet in the same collectives; the driver samples and broadcasts its tokens on the device, so
async scheduling and the decode graphs work as they do on one GPU. A rank that dies ends the engine: the
others are killed and the core's next call raises (gloo fails the collective at once, NCCL after
COLLECTIVE_TIMEOUT_S). Without tensor parallelism the core calls its ModelRunner directly (no executor)."""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import msgspec
import torch

from engine.config import EngineConfig
from engine.distributed import (
    TPInfo,
    destroy_distributed,
    disable_nvlink_multicast,
    ensure_no_process_group,
    free_init_method,
    init_distributed,
    rank_device,
)
from engine.hf_config import load_hf_config
from engine.model_files import ModelFiles
from engine.model_runner import ModelRunner, StepHandle
from engine.models.llama import LlamaModelConfig
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.structured_output import StructuredOutputManager

logger = logging.getLogger("tokenrelay.engine")

STARTUP_TIMEOUT_S = 1800.0  # a rank loading a large checkpoint shard


class ModelExecutor(Protocol):
    """What the EngineCore calls: a ModelRunner itself, or a MultiprocExecutor over several."""

    def num_kv_blocks_from_memory(self) -> int: ...
    def allocate_kv_cache(self, num_blocks: int) -> None: ...
    def capture_cudagraphs(self) -> None: ...
    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle: ...
    def wait(self, handle: StepHandle) -> ModelRunnerOutput: ...


# ---- the wire: core -> rank, rank -> core -----------------------------------------------------------
class _Launch(msgspec.Struct, array_like=True, tag=1):
    scheduler_output: SchedulerOutput


class _Wait(msgspec.Struct, array_like=True, tag=2):
    """Read the oldest launched step's tokens (the order matches the driver's)."""


class _SizeKVCache(msgspec.Struct, array_like=True, tag=3):
    """num_kv_blocks_from_memory; answered with _NumBlocks."""


class _AllocateKVCache(msgspec.Struct, array_like=True, tag=4):
    num_blocks: int


class _CaptureGraphs(msgspec.Struct, array_like=True, tag=5):
    """capture_cudagraphs; answered with _Done."""


class _Stop(msgspec.Struct, array_like=True, tag=6):
    pass


class _Done(msgspec.Struct, array_like=True, tag=7):
    """Loaded (after start) or graphs captured."""


class _NumBlocks(msgspec.Struct, array_like=True, tag=8):
    num_blocks: int


class _RankFailed(msgspec.Struct, array_like=True, tag=9):
    message: str
    is_config_error: bool


_Command = _Launch | _Wait | _SizeKVCache | _AllocateKVCache | _CaptureGraphs | _Stop
_COMMANDS = msgspec.msgpack.Decoder(_Command)
_REPLIES = msgspec.msgpack.Decoder(_Done | _NumBlocks | _RankFailed)


# ---- a rank's process -------------------------------------------------------------------------------
def _rank_main(config: EngineConfig, files: ModelFiles, max_model_len: int, tp: TPInfo, init_method: str,
               commands: Connection, replies: Connection, core_alive: Connection, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the core decides when ranks stop
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s rank={tp.rank} %(message)s")
    # A rank blocked in a collective never reads its pipe again: this thread ends it when the core dies.
    threading.Thread(target=_exit_with_core, args=(core_alive,), name="tokenrelay-rank-watch", daemon=True).start()
    encoder = msgspec.msgpack.Encoder()
    try:
        init_distributed(tp, rank_device(config.device, tp.rank), init_method)
        runner = ModelRunner(config, files, load_hf_config(files), max_model_len, None, tp)
        replies.send_bytes(encoder.encode(_Done()))
        _serve(runner, commands, replies, encoder)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.warning("tensor-parallel rank %d: the engine core is gone; exiting", tp.rank)
    except BaseException as exc:
        logger.exception("tensor-parallel rank %d failed", tp.rank)
        with contextlib.suppress(OSError):
            replies.send_bytes(encoder.encode(_RankFailed(f"{exc}", isinstance(exc, ValueError))))
        sys.exit(1)
    finally:
        destroy_distributed()


def _serve(runner: ModelRunner, commands: Connection, replies: Connection, encoder: msgspec.msgpack.Encoder
           ) -> None:
    handles: collections.deque[StepHandle] = collections.deque()
    while True:
        command = _COMMANDS.decode(commands.recv_bytes())
        if isinstance(command, _Launch):
            handles.append(runner.launch(command.scheduler_output))
        elif isinstance(command, _Wait):
            runner.wait(handles.popleft())
        elif isinstance(command, _SizeKVCache):
            replies.send_bytes(encoder.encode(_NumBlocks(runner.num_kv_blocks_from_memory())))
        elif isinstance(command, _AllocateKVCache):
            runner.allocate_kv_cache(command.num_blocks)
        elif isinstance(command, _CaptureGraphs):
            runner.capture_cudagraphs()
            replies.send_bytes(encoder.encode(_Done()))
        else:
            return


def _exit_with_core(core_alive: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        core_alive.recv_bytes()  # the core never writes: this returns when its end closes
    os._exit(0)


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """multiprocessing refuses children to a daemonic process, and MPEngine's core is one (so that it
    dies with its parent). What the rule guards against, children outliving their parent, cannot happen
    here: a rank exits when the core's end of its pipe closes (_exit_with_core)."""
    process_config: dict[str, Any] = mp.current_process()._config  # type: ignore[attr-defined]
    was_daemon = process_config.get("daemon")
    process_config["daemon"] = False
    try:
        yield
    finally:
        if was_daemon is not None:
            process_config["daemon"] = was_daemon


class _Rank:
    """The core's handle on one rank process."""

    def __init__(self, ctx: Any, config: EngineConfig, files: ModelFiles, max_model_len: int, tp: TPInfo,
                 init_method: str) -> None:
        self.rank = tp.rank
        commands_r, self.commands = ctx.Pipe(duplex=False)
        self.replies, replies_w = ctx.Pipe(duplex=False)
        alive_r, self.alive = ctx.Pipe(duplex=False)
        self.process: BaseProcess = ctx.Process(
            target=_rank_main, name=f"tokenrelay-tp-rank-{tp.rank}", daemon=True,
            args=(config, files, max_model_len, tp, init_method, commands_r, replies_w, alive_r,
                  logging.getLogger().getEffectiveLevel()))
        with _children_allowed():
            self.process.start()
        for end in (commands_r, replies_w, alive_r):
            end.close()
        logger.info("tensor-parallel rank %d pid=%s", tp.rank, self.process.pid)

    def send(self, data: bytes) -> None:
        try:
            self.commands.send_bytes(data)
        except OSError as exc:
            raise self.died() from exc

    def expect(self, reply_type: type[Any], timeout_s: float) -> Any:
        """The rank's next reply, of reply_type; its death or failure raises."""
        ready = wait([self.replies, self.process.sentinel], timeout_s)
        if self.replies in ready:
            with contextlib.suppress(EOFError, OSError):
                reply = _REPLIES.decode(self.replies.recv_bytes())
                if isinstance(reply, _RankFailed):
                    self.process.join(5)
                    raise (ValueError if reply.is_config_error else RuntimeError)(
                        f"tensor-parallel rank {self.rank} failed: {reply.message}")
                assert isinstance(reply, reply_type), f"rank {self.rank} answered {reply!r}"
                return reply
        if not ready:
            raise RuntimeError(f"tensor-parallel rank {self.rank} did not answer within {timeout_s:.0f}s")
        raise self.died()

    def died(self) -> RuntimeError:
        self.process.join(5)
        return RuntimeError(f"tensor-parallel rank {self.rank} (pid {self.process.pid}) died "
                            f"(exit code {self.process.exitcode})")

    def stop(self, timeout_s: float) -> None:
        with contextlib.suppress(OSError):
            self.commands.send_bytes(msgspec.msgpack.encode(_Stop()))
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        for end in (self.commands, self.replies, self.alive):
            end.close()


class _RankGroup:
    """Ranks 1..N-1 and what is known of their health: the watcher thread's and the finalizer's state,
    apart from the executor so that neither keeps the executor alive."""

    def __init__(self, ranks: list[_Rank]) -> None:
        self.ranks = ranks
        self.failure: RuntimeError | None = None
        self.is_stopping = False
        self.owns_process_group = False  # this engine joined it (leave it on close)

    def watch(self) -> None:
        """A rank that dies takes the others down with it, so no survivor waits in a collective; the
        core's own collective then fails and its next call raises the death."""
        sentinels = {rank.process.sentinel: rank for rank in self.ranks}
        dead = wait(list(sentinels))
        if self.is_stopping:
            return
        self.failure = sentinels[dead[0]].died()  # type: ignore[index]
        logger.error("%s: stopping the other ranks", self.failure)
        for other in self.ranks:
            if other.process.is_alive():
                other.process.kill()

    def first_dead(self) -> RuntimeError | None:
        """The failure, or a rank found dead now (a collective fails before the watcher has looked)."""
        if self.failure is None:
            dead = next((rank for rank in self.ranks if not rank.process.is_alive()), None)
            self.failure = dead.died() if dead is not None else None
        return self.failure

    def close(self) -> None:
        self.is_stopping = True
        for rank in self.ranks:
            rank.stop(timeout_s=10.0)
        if self.owns_process_group:
            self.owns_process_group = False
            destroy_distributed()


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, files: ModelFiles, hf_config: Any, max_model_len: int,
                 structured_output: StructuredOutputManager | None) -> None:
        size = config.tensor_parallel_size
        tp = TPInfo(0, size)
        LlamaModelConfig.from_hf(hf_config, tp)  # the heads must split: ValueError before anything starts
        device = rank_device(config.device, 0)
        if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={size} from {device} needs {(device.index or 0) + size} "
                             f"GPUs; this host has {torch.cuda.device_count()}")
        ensure_no_process_group()  # before any rank starts
        disable_nvlink_multicast()  # this process is rank 0 (and the ranks inherit its environment)
        init_method = free_init_method()
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA state
        self._group = group = _RankGroup([_Rank(ctx, config, files, max_model_len, TPInfo(rank, size), init_method)
                                          for rank in range(1, size)])
        # An engine dropped without shutdown() still stops its ranks (they would also exit with this
        # process; until then they hold their GPUs). shutdown() runs it now, once.
        self.shutdown = weakref.finalize(self, group.close)
        self._encoder = msgspec.msgpack.Encoder()
        try:
            init_distributed(tp, device, init_method)
            group.owns_process_group = True
            self.driver = ModelRunner(config, files, hf_config, max_model_len, structured_output, tp)
            for rank in group.ranks:
                rank.expect(_Done, STARTUP_TIMEOUT_S)
        except BaseException:
            for rank in group.ranks:  # a rank may be stuck in the rendezvous: no graceful stop
                rank.process.kill()
            self.shutdown()
            raise
        threading.Thread(target=group.watch, name="tokenrelay-tp-watch", daemon=True).start()

    @property
    def rank_pids(self) -> list[int | None]:
        return [rank.process.pid for rank in self._group.ranks]

    # ---- the runner's interface, on every rank ---------------------------------------------------
    def num_kv_blocks_from_memory(self) -> int:
        """The fewest blocks any rank has room for (each holds the same blocks, of its own heads)."""
        self._send(_SizeKVCache())
        own = self.driver.num_kv_blocks_from_memory()
        return min([own, *(rank.expect(_NumBlocks, STARTUP_TIMEOUT_S).num_blocks for rank in self._group.ranks)])

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._send(_AllocateKVCache(num_blocks))
        self.driver.allocate_kv_cache(num_blocks)

    def capture_cudagraphs(self) -> None:
        self._send(_CaptureGraphs())
        self.driver.capture_cudagraphs()
        for rank in self._group.ranks:
            rank.expect(_Done, STARTUP_TIMEOUT_S)

    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        self._send(_Launch(scheduler_output))
        with self._naming_dead_ranks():
            return self.driver.launch(scheduler_output)

    def wait(self, handle: StepHandle) -> ModelRunnerOutput:
        self._send(_Wait())
        with self._naming_dead_ranks():
            return self.driver.wait(handle)

    @contextlib.contextmanager
    def _naming_dead_ranks(self) -> Iterator[None]:
        """A collective fails when a peer died: raise that death, not gloo's socket error."""
        try:
            yield
        except Exception as exc:
            failure = self._group.first_dead()
            if failure is None:
                raise
            raise failure from exc

    def _send(self, command: _Command) -> None:
        if self._group.failure is not None:
            raise self._group.failure
        data = self._encoder.encode(command)
        for rank in self._group.ranks:
            rank.send(data)
