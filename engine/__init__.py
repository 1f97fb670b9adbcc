"""tokenrelay's continuous-batching engine: paged KV cache, token-budget scheduler, own model code.

Imports nothing from worker/ or redis: the GPU image runs it bare."""

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, PromptTooLongError, UnsupportedModelError
from engine.outputs import FinishReason, RequestOutput
from engine.sampling_params import SamplingParams, StructuredOutputParams
from engine.stats import EngineStats

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "LLMEngine",
    "PromptTooLongError",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputParams",
    "UnsupportedModelError",
]


def __getattr__(name: str) -> object:
    # LLMEngine pulls in torch and transformers: load it only when asked for.
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
