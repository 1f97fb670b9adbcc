"""InputProcessor: prompt, messages or token ids -> a validated Request, without the model.

Everything a request needs before it meets the scheduler (tokenizer, chat template, vocab and length
checks, the seed of an unseeded request) lives here, so a front end that does not hold the model (the
parent of an engine core process) validates and tokenizes exactly as LLMEngine does."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from engine import structured_output
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.hf_config import HFConfig, load_hf_config
from engine.model_files import ModelFiles, resolve_model
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.tokenizer import encode_prompt, eos_token_ids, load_tokenizer


def resolve_config_model(config: EngineConfig) -> ModelFiles:
    """The one model resolution of an engine (its core process gets the result, not the spec)."""
    return resolve_model(config.model, Path(config.cache_dir).expanduser() if config.cache_dir else None)


def resolve_max_model_len(config: EngineConfig, hf_config: HFConfig) -> int:
    max_positions = hf_config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > max_positions:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's "
                         f"max_position_embeddings={max_positions}; lower max_model_len")
    return int(config.max_model_len or max_positions)


class InputProcessor:
    def __init__(self, config: EngineConfig, files: ModelFiles | None = None,
                 hf_config: HFConfig | None = None) -> None:
        self.files = files if files is not None else resolve_config_model(config)
        hf_config = hf_config if hf_config is not None else load_hf_config(self.files)
        self.max_model_len = resolve_max_model_len(config, hf_config)
        self.vocab_size: int = hf_config.vocab_size
        self.tokenizer = load_tokenizer(self.files.config_dir)
        self.eos_token_ids = eos_token_ids(self.files.config_dir, self.tokenizer)
        # One thread encodes (intake) while another decodes (the step loop or the output thread): fast
        # tokenizers are not safe to share across threads without this.
        self.tokenizer_lock = threading.Lock()
        self._seed_rng = random.Random(config.seed)
        self._seed_lock = threading.Lock()

    def make_request(
        self,
        request_id: str,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        params: SamplingParams | None = None,
        priority: int = 0,
        lane_rank: int = 0,
        resume_token_ids: list[int] | None = None,
    ) -> Request:
        """Validate and tokenize: safe to call from any thread."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string")
        params = params if params is not None else SamplingParams()
        if params.structured_output is not None:
            structured_output.check(params.structured_output)  # a bad schema fails here, not in a step
        with self.tokenizer_lock:
            token_ids = encode_prompt(self.tokenizer, prompt=prompt, messages=messages,
                                      prompt_token_ids=prompt_token_ids, vocab_size=self.vocab_size)
        resumed = list(resume_token_ids or [])
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in resumed):
            raise InvalidRequestError(f"resume_token_ids must be ints in [0, {self.vocab_size})")
        num_tokens = len(token_ids) + len(resumed)
        if num_tokens + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens (+{len(resumed)} resumed); with at least one "
                f"token to generate it exceeds max_model_len={self.max_model_len}: shorten the prompt")
        if params.seed is not None:
            seed = params.seed
        else:
            with self._seed_lock:
                seed = self._seed_rng.getrandbits(31)
        return Request(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                       eos_token_ids=self.eos_token_ids, priority=priority, lane_rank=lane_rank,
                       seed=seed, output_token_ids=resumed)
