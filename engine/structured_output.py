"""Structured outputs: the grammar a request's output must match (a JSON schema, any JSON object, a
regex or a list of choices), compiled by xgrammar once per spec and cached, one matcher per request
that advances with every accepted token, and the token bitmask the sampler applies to the logits.

Who calls what: the input processor checks a spec (`check`, no tokenizer: cheap, in the caller's
thread); the engine core compiles it when the request is added (`StructuredOutputManager.compile`, in
the step loop, so the tokenizer-dependent work happens once per spec; the core loads the vocabulary
for it on the first grammar only, and otherwise never sees a tokenizer); the model runner owns each
request's `RequestGrammar`, fills the bitmask of a step's constrained rows and feeds every sampled
token back. A request that the runner sees again (preempted, or resumed after another worker died)
gets a fresh matcher that replays its output tokens, so the grammar state always equals the tokens."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import InvalidRequestError
from engine.sampling_params import StructuredOutputParams

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger("tokenrelay.engine")

MAX_CACHED_GRAMMARS = 256  # compiled grammars kept (LRU); a JSON schema's is tens of KB to a few MB
# xgrammar's messages start with "[hh:mm:ss] /project/cpp/file.cc:123: ": the user needs the rest.
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # the engine extra installs it; a bare engine without it serves no grammar
        raise InvalidRequestError(
            "structured outputs need the xgrammar package on the worker (pip install 'tokenrelay[engine]')"
        ) from exc
    return xgrammar


def _grammar(params: StructuredOutputParams) -> xgrammar.Grammar:
    """The xgrammar Grammar of a spec (no tokenizer involved); InvalidRequestError when it is bad."""
    xgr = _xgrammar()
    try:
        if params.kind == "json_schema":
            # Compact JSON (no free whitespace): a small model cannot wander into endless newlines.
            return xgr.Grammar.from_json_schema(params.spec, any_whitespace=False, strict_mode=True)
        if params.kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if params.kind == "regex":
            return xgr.Grammar.from_regex(params.spec)
        # choice: one EBNF alternative per string; JSON string escapes are EBNF string escapes.
        choices = json.loads(params.spec)
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    except (RuntimeError, ValueError, TypeError) as exc:
        message = _XGRAMMAR_PREFIX.sub("", str(exc).strip()).splitlines()[0] if str(exc).strip() else repr(exc)
        raise InvalidRequestError(f"{_FIELD[params.kind]} cannot be compiled: {message}") from None


_FIELD = {"json_schema": "response_format.json_schema.schema", "json_object": "response_format",
          "regex": "regex", "choice": "choice"}


def check(params: StructuredOutputParams) -> None:
    """Raise InvalidRequestError when the spec cannot become a grammar (cheap: no tokenizer)."""
    _grammar(params)


class RequestGrammar:
    """One request's matcher: its state is the grammar after the request's output tokens so far."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, req_id: str) -> None:
        self.matcher = matcher
        self.req_id = req_id
        self.num_rejected = 0

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. A rejected token leaves the state as it was (it cannot happen
        with the bitmask applied, except after the grammar ended: logged, the request goes on)."""
        if self.matcher.is_terminated() or self.matcher.accept_token(token_id):
            return True
        self.num_rejected += 1
        if self.num_rejected == 1:
            logger.warning("request=%s token %d does not match its grammar", self.req_id, token_id)
        return False

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class StructuredOutputManager:
    """Compiles specs against one tokenizer (cached, keyed by the spec) and fills bitmasks.

    `load_vocabulary` returns (the HF tokenizer, the ids that end generation); it is called on the first
    compile only. Used from the engine's step loop; the cache lock covers a compile from another thread."""

    def __init__(self, load_vocabulary: Callable[[], tuple[Any, Iterable[int]]], vocab_size: int,
                 max_cached: int = MAX_CACHED_GRAMMARS) -> None:
        self._load_vocabulary = load_vocabulary
        self.vocab_size = vocab_size  # the model's (logits width), which may exceed the tokenizer's
        self.max_cached = max_cached
        self.num_compiled = 0  # cache misses, for tests and logs
        self._cache: OrderedDict[StructuredOutputParams, xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._batch: xgrammar.BatchGrammarMatcher | None = None
        self._num_threads = max(1, min(8, os.cpu_count() or 1))

    @property
    def bitmask_width(self) -> int:
        return -(-self.vocab_size // 32)

    def _get_compiler(self) -> xgrammar.GrammarCompiler:
        # Built on first use: TokenizerInfo reads the whole vocabulary (a second on a 150k vocab).
        if self._compiler is None:
            xgr = _xgrammar()
            tokenizer, stop_token_ids = self._load_vocabulary()
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=sorted(stop_token_ids) or None)
            # Our LRU is the cache (keyed by the spec); xgrammar's own would hold a second copy.
            self._compiler = xgr.GrammarCompiler(info, max_threads=self._num_threads, cache_enabled=False)
        return self._compiler

    def compile(self, params: StructuredOutputParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar of a spec: from the cache, or compiled now. InvalidRequestError if bad."""
        with self._lock:
            compiled = self._cache.get(params)
            if compiled is not None:
                self._cache.move_to_end(params)
                return compiled
            compiled = self._get_compiler().compile_grammar(_grammar(params))
            self.num_compiled += 1
            self._cache[params] = compiled
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return compiled

    def new_request_grammar(self, req_id: str, params: StructuredOutputParams,
                            output_token_ids: Sequence[int]) -> RequestGrammar:
        """A matcher for a request the runner takes in, advanced past the outputs it already has
        (a preempted request is recomputed, a resumed one continues after the published tokens)."""
        grammar = RequestGrammar(_xgrammar().GrammarMatcher(self.compile(params)), req_id)
        for token_id in output_token_ids:
            grammar.accept(token_id)
        return grammar

    def fill_bitmask(self, grammars: Sequence[RequestGrammar], pin_memory: bool = False) -> torch.Tensor:
        """The allowed next tokens of each grammar: [len(grammars), ceil(vocab/32)] int32 on the CPU,
        bit j of row i set when token j may follow. Rows are filled in parallel by xgrammar's threads."""
        bitmask = torch.full((len(grammars), self.bitmask_width), -1, dtype=torch.int32, pin_memory=pin_memory)
        # A terminated matcher (it accepted a stop token, so its request is ending) keeps an open row.
        rows = [i for i, g in enumerate(grammars) if not g.is_terminated]
        if len(rows) == 1:
            grammars[rows[0]].matcher.fill_next_token_bitmask(bitmask, rows[0])
        elif rows:
            if self._batch is None:
                self._batch = _xgrammar().BatchGrammarMatcher(max_threads=self._num_threads)
            self._batch.batch_fill_next_token_bitmask([grammars[i].matcher for i in rows], bitmask,
                                                      indices=rows if len(rows) < len(grammars) else None)
        return bitmask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None) -> None:
    """Set to -inf, in place, the logits of tokens the bitmask forbids. bitmask [K, ceil(V/32)] int32 on
    the logits' device holds the rows `rows` ([K] int64 indices into logits' [N, V]; None: K == N)."""
    apply = _xgrammar().apply_token_bitmask_inplace
    vocab_size = logits.shape[-1]
    if rows is None:
        apply(logits, bitmask, vocab_size=vocab_size)
        return
    # Only the constrained rows travel and get masked: gather them, mask, put them back.
    constrained = logits.index_select(0, rows)
    apply(constrained, bitmask, vocab_size=vocab_size)
    logits.index_copy_(0, rows, constrained)
