"""Structured outputs in the engine: specs that cannot compile are invalid requests, grammars compile once
per spec, the bitmask constrains exactly the constrained rows of a mixed batch, and the grammar state
follows every accepted token through async scheduling, preemption and resumed requests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from engine import EngineConfig, InvalidRequestError, SamplingParams, StructuredOutputParams
from engine.llm_engine import LLMEngine
from engine.sampler import SamplingMetadata, sample
from engine.structured_output import StructuredOutputManager, check

# Nested objects, enums, arrays; every string, array and number bounded, so even a random model's
# constrained output ends well inside max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},  # maxLength would admit control characters
        "kind": {"enum": ["cat", "dog", "fox"]},
        "owner": {"type": "object",
                  "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99},
                                 "verified": {"type": "boolean"}},
                  "required": ["age", "verified"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "kind", "owner", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = StructuredOutputParams("json_schema", json.dumps(SCHEMA))


def _engine(model_dir: Path, **knobs: object) -> LLMEngine:
    options: dict[str, object] = {"num_kv_blocks": 128, "max_num_seqs": 8, "max_model_len": 256, **knobs}
    return LLMEngine(EngineConfig(model=str(model_dir), **options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    """One step at a time: the reference for the schedules below."""
    return _engine(tiny_model_dir, async_scheduling=False)


PROMPTS = ["The quick brown fox", "Hello world", "Redis streams carry", "def main():", "A paged KV cache",
           "Bonjour le monde", "numbers 0123", "user: what is"]


# ---- specs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "field"), [
    (StructuredOutputParams("json_schema", '{"type": "bogus"}'), "response_format.json_schema.schema"),
    (StructuredOutputParams("json_schema", '{"type": "object", "properties": 5}'), "response_format.json_schema.schema"),
    (StructuredOutputParams("json_schema", "not json"), "response_format.json_schema.schema"),
    (StructuredOutputParams("regex", "(ab"), "regex"),
])
def test_a_spec_that_cannot_compile_is_an_invalid_request(params: StructuredOutputParams, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(field) + " cannot be compiled: ") as info:
        check(params)
    assert "/project/cpp" not in str(info.value)  # xgrammar's source location is cut off


def test_bad_choices_and_ignore_eos_are_rejected_by_the_params() -> None:
    for spec in ("[]", '[""]', '"yes"', "[1]", "nope"):
        with pytest.raises(ValueError, match="choice must be a non-empty list"):
            StructuredOutputParams("choice", spec)
    with pytest.raises(ValueError, match="kind must be one of"):
        StructuredOutputParams("grammar", "root ::= x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ignore_eos cannot be combined"):
        SamplingParams(ignore_eos=True, structured_output=JSON_SCHEMA)
    # The engine core's pipe carries params as plain values.
    assert SamplingParams(structured_output={"kind": "regex", "spec": "a+"}).structured_output == \
        StructuredOutputParams("regex", "a+")  # type: ignore[arg-type]


def test_the_engine_rejects_a_bad_schema_and_keeps_serving(engine: LLMEngine) -> None:
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        engine.add_request("bad", "hi", params=SamplingParams(
            structured_output=StructuredOutputParams("json_schema", '{"type": 7}')))
    out = engine.generate(["hi"], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out.token_ids) == 4


def test_a_spec_compiles_once_and_the_cache_is_bounded(engine: LLMEngine) -> None:
    manager = StructuredOutputManager(lambda: (engine.tokenizer, engine.eos_token_ids), engine.vocab_size,
                                      max_cached=2)
    a, b, c = (StructuredOutputParams("regex", p) for p in ("a+", "b+", "c+"))
    first = manager.compile(a)
    assert manager.compile(StructuredOutputParams("regex", "a+")) is first and manager.num_compiled == 1
    manager.compile(b)
    manager.compile(c)  # evicts a, the least recently used
    assert manager.num_compiled == 3
    manager.compile(c)
    assert manager.num_compiled == 3
    manager.compile(a)
    assert manager.num_compiled == 4


def test_a_replayed_matcher_masks_like_one_advanced_token_by_token(engine: LLMEngine) -> None:
    manager = engine.core.structured_output
    text = '{"name": "ab", "kind": "dog", "owner": {"age": 4'
    token_ids = engine.tokenizer.encode(text)
    stepped = manager.new_request_grammar("stepped", JSON_SCHEMA, [])
    masks = []
    for token_id in token_ids:
        masks.append(manager.fill_bitmask([stepped]))
        assert stepped.accept(token_id)
    replayed = manager.new_request_grammar("replayed", JSON_SCHEMA, token_ids)
    assert torch.equal(manager.fill_bitmask([replayed]), manager.fill_bitmask([stepped]))
    assert not torch.equal(masks[0], manager.fill_bitmask([replayed]))
    # Batched fill (several rows in xgrammar's threads) equals one row at a time.
    fresh = manager.new_request_grammar("fresh", JSON_SCHEMA, [])
    batched = manager.fill_bitmask([fresh, replayed, stepped])
    assert torch.equal(batched[0], masks[0][0]) and torch.equal(batched[1], batched[2])


# ---- the sampler ---------------------------------------------------------------------------------
def test_the_bitmask_constrains_only_its_rows() -> None:
    vocab_size, num_rows = 100, 4
    logits = torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3)] * 2
    md = SamplingMetadata.from_params(params, [3] * num_rows, [5] * num_rows, [[0]] * num_rows, [1] * num_rows,
                                      vocab_size, "cpu")
    free, _ = sample(logits.clone(), md)
    allowed = [7, 42]  # rows 1 and 2 may only pick these
    bitmask = torch.zeros((2, 4), dtype=torch.int32)
    for token_id in allowed:
        bitmask[:, token_id // 32] |= 1 << (token_id % 32)
    md.token_bitmask, md.bitmask_rows = bitmask, torch.tensor([1, 2])
    md.max_num_logprobs = 2
    constrained, logprobs = sample(logits.clone(), md)
    assert constrained[1].item() in allowed and constrained[2].item() in allowed
    assert constrained[0] == free[0] and constrained[3] == free[3]
    assert free[1].item() not in allowed or free[2].item() not in allowed  # else the mask proved nothing
    # Logprobs are the model's own: the mask does not renormalise them.
    assert logprobs is not None
    assert torch.allclose(logprobs.top_logprobs, logits.log_softmax(-1).topk(2).values)


# ---- the engine ----------------------------------------------------------------------------------
def _outputs(engine: LLMEngine, params: list[SamplingParams]) -> list[tuple[list[int], str | None, str]]:
    return [(o.token_ids, o.finish_reason, o.text) for o in engine.generate(PROMPTS[:len(params)], params)]


def _mixed_params() -> list[SamplingParams]:
    grammars: list[StructuredOutputParams | None] = [
        JSON_SCHEMA, None, StructuredOutputParams("json_object"), StructuredOutputParams("regex", "[a-c]{2,5}x"),
        None, StructuredOutputParams("choice", json.dumps(["yes", "no", "ça 🚀"])), JSON_SCHEMA, None]
    return [SamplingParams(max_tokens=40 if g is None else 120, temperature=[0.0, 0.9][i % 2], seed=i,
                           structured_output=g) for i, g in enumerate(grammars)]


def _assert_valid(params: list[SamplingParams], outputs: list[tuple[list[int], str | None, str]]) -> None:
    for p, (_, finish_reason, text) in zip(params, outputs, strict=True):
        so = p.structured_output
        if so is None:
            continue
        assert finish_reason == "stop", (so, text)
        if so.kind == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif so.kind == "json_object":
            assert isinstance(json.loads(text), dict)
        elif so.kind == "regex":
            assert re.fullmatch(so.spec, text), text
        else:
            assert text in json.loads(so.spec)


def test_constrained_outputs_match_their_grammar_and_leave_the_others_alone(
        engine: LLMEngine, reference: list[tuple[list[int], str | None, str]]) -> None:
    params = _mixed_params()
    outputs = reference
    _assert_valid(params, outputs)
    # The unconstrained requests of the mixed batch generate what they generate alone.
    for i, p in enumerate(params):
        if p.structured_output is None:
            alone = engine.generate([PROMPTS[i]], p)[0]
            assert alone.token_ids == outputs[i][0]
    # And the grammar really steered: the same request without it says something else.
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=40, temperature=0.0, seed=0))[0]
    assert free.text != outputs[0][2]


KNOBS = {
    "async": {"async_scheduling": True},
    "preemption": {"async_scheduling": True, "num_kv_blocks": 20, "block_size": 8},
}


@pytest.fixture(scope="module")
def reference(engine: LLMEngine) -> list[tuple[list[int], str | None, str]]:
    return _outputs(engine, _mixed_params())


@pytest.mark.parametrize("knobs", list(KNOBS.values()), ids=list(KNOBS))
def test_the_grammar_follows_every_token_whatever_the_schedule(
        knobs: dict, tiny_model_dir: Path, reference: list[tuple[list[int], str | None, str]]) -> None:
    params = _mixed_params()
    other = _engine(tiny_model_dir, **knobs)
    preemptions = other.scheduler.num_preemptions
    assert _outputs(other, params) == reference
    _assert_valid(params, reference)
    if "num_kv_blocks" in knobs:
        assert other.scheduler.num_preemptions > preemptions  # else preemption was not exercised


def test_async_scheduling_runs_ahead_of_a_grammar_and_samples_once_its_token_arrives(tiny_model_dir: Path,
                                                                                    engine: LLMEngine) -> None:
    # The step launched ahead queues its forward at once; its sampling (the bitmask needs the token in
    # flight) waits for the step before it: same tokens as one step at a time.
    other = _engine(tiny_model_dir, async_scheduling=True)
    ahead, deferred = [0], [0]
    schedule_ahead, finish = other.scheduler.schedule_ahead, other.model_runner._finish_deferred

    def counting_ahead() -> object:
        output = schedule_ahead()
        ahead[0] += output is not None
        return output

    def counting_finish() -> None:
        deferred[0] += 1
        finish()

    other.scheduler.schedule_ahead = counting_ahead  # type: ignore[method-assign]
    other.model_runner._finish_deferred = counting_finish  # type: ignore[method-assign]
    params = [SamplingParams(max_tokens=12, temperature=0.0, structured_output=JSON_SCHEMA),
              SamplingParams(max_tokens=12, temperature=0.8, seed=3, structured_output=JSON_SCHEMA)]
    assert _outputs(other, params) == _outputs(engine, params)
    assert ahead[0] > 5 and deferred[0] == ahead[0]


def test_a_grammar_keeps_tensor_parallel_steps_synchronous(tiny_model_dir: Path) -> None:
    # Several ranks sample in lockstep with the driver: no deferred sampling there, so no step ahead.
    from engine.request import Request
    from engine.scheduler import Scheduler

    config = EngineConfig(model=str(tiny_model_dir), async_scheduling=True, tensor_parallel_size=2)
    for grammar, can in ((JSON_SCHEMA, False), (None, True)):
        scheduler = Scheduler(config, num_kv_blocks=64, max_model_len=256)
        scheduler.add_request(Request("r", [1, 2, 3], SamplingParams(max_tokens=4, structured_output=grammar)))
        scheduler.schedule()
        assert scheduler.can_schedule_ahead() is can


def test_a_resumed_request_continues_its_grammar(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=120, temperature=0.0, structured_output=JSON_SCHEMA)
    whole = engine.generate([PROMPTS[2]], params)[0]
    assert len(whole.token_ids) > 6
    cut = 5
    engine.add_request("resumed", PROMPTS[2], params=params, resume_token_ids=whole.token_ids[:cut])
    token_ids: list[int] = []
    finished = False
    while not finished:
        for out in engine.step():
            if out.request_id == "resumed":
                token_ids += out.token_ids
                finished = out.finished
    assert whole.token_ids[:cut] + token_ids == whole.token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_with_cuda_graphs(tiny_model_dir: Path) -> None:
    params = _mixed_params()
    gpu = _engine(tiny_model_dir, device="cuda", dtype="float32", gpu_memory_utilization=0.3, num_kv_blocks=None)
    outputs = _outputs(gpu, params)
    _assert_valid(params, outputs)
    for i, p in enumerate(params):
        if p.structured_output is None:
            assert gpu.generate([PROMPTS[i]], p)[0].token_ids == outputs[i][0]


def test_a_deferred_step_keeps_logprobs_and_survives_an_abort(tiny_model_dir: Path, engine: LLMEngine) -> None:
    # Logprobs come out of the deferred sampling as they come out of one step at a time; a constrained
    # request aborted while a step launched ahead is in flight ends there and the others go on unchanged.
    params = [SamplingParams(max_tokens=10, temperature=0.0, logprobs=2, structured_output=JSON_SCHEMA),
              SamplingParams(max_tokens=10, temperature=0.7, seed=9, logprobs=1)]
    other = _engine(tiny_model_dir, async_scheduling=True)

    def rounded(outs: list) -> list:
        return [(o.token_ids, [{k: round(v, 4) for k, v in d.items()} for d in o.logprobs or []]) for o in outs]

    assert rounded(other.generate(PROMPTS[:2], params)) == rounded(engine.generate(PROMPTS[:2], params))
    expected = engine.generate([PROMPTS[3]], params[1])[0].token_ids
    other.add_request("doomed", PROMPTS[2], params=SamplingParams(max_tokens=40, structured_output=JSON_SCHEMA))
    other.add_request("free", PROMPTS[3], params=params[1])
    finished: dict[str, tuple[str | None, list[int]]] = {}
    tokens: dict[str, list[int]] = {"doomed": [], "free": []}
    steps = 0
    while other.has_unfinished():
        for out in other.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished[out.request_id] = (out.finish_reason, tokens[out.request_id])
        steps += 1
        # Between steps no sampling is left waiting: the step in flight was sampled when its
        # predecessor was read.
        assert other.model_runner._deferred is None
        if steps == 3:
            other.abort("doomed")
    assert finished["doomed"][0] == "abort"
    assert finished["free"][1] == expected
