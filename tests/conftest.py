from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any test module
# imports kernels/: without a GPU the kernels run under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The embedded model's GGUF config and tokenizer are converted once per test session (and by the
# worker subprocesses the tests start, which inherit it), never into the developer's own cache.
if "TOKENRELAY_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TOKENRELAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="tokenrelay-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TOKENRELAY_CACHE_DIR"], ignore_errors=True)

from pathlib import Path

import pytest

from tests.helpers.tiny_models import ARCHITECTURES, make_tiny_model

pytest_plugins = ["tests.helpers.redis_server"]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per supported architecture, made once per test session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["qwen3"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long fault-injection tests (marked `reliability`) run in CI (CI=true) or when asked for with
    `-m reliability` / `TOKENRELAY_TEST_RELIABILITY=1`; a developer's plain `pytest` stays quick."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("TOKENRELAY_TEST_RELIABILITY") == "1":
        return
    if "reliability" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long fault-injection test: runs in CI (CI=true) or with -m reliability")
    for item in items:
        if "reliability" in item.keywords:
            item.add_marker(skip)
