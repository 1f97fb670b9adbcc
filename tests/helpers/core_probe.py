"""A spawned child that takes the engine core process's path (import engine.mp_engine, build an EngineCore)
and reports which modules that loaded. Kept free of transformers itself, so what it reports is the core's."""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection

from engine.config import EngineConfig
from engine.model_files import ModelFiles


def report_core_modules(config: EngineConfig, files: ModelFiles, conn: Connection) -> None:
    """Send (num_kv_blocks, the loaded top-level package names) of a core built here."""
    import engine.mp_engine  # noqa: F401  (the module a spawned core process starts from)
    from engine.core import EngineCore

    core = EngineCore(config, files)
    conn.send((core.num_kv_blocks, sorted({name.partition(".")[0] for name in sys.modules})))
    conn.close()
