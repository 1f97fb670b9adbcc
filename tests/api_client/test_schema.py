"""Wire schema: every bad job payload is a JobError with the right code (and id when readable)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api_client.schema import (
    MAX_TOKENS_CAP,
    DoneEvent,
    ErrorEvent,
    Job,
    JobError,
    Params,
    TokenEvent,
    dump_event,
    parse_event,
    parse_job,
)

LIMIT = 4096


def _job(**fields: object) -> str:
    return json.dumps({"id": "job-1", "prompt": "hello", **fields})


def _error(raw: bytes | str, limit: int = LIMIT) -> JobError:
    with pytest.raises(JobError) as info:
        parse_job(raw, limit)
    return info.value


@pytest.mark.parametrize("raw, expected_id", [
    ('{"id": "job-1", "prompt": "hi"', None),  # truncated
    ("not json", None),
    ("", None),
])
def test_malformed_json(raw: str, expected_id: str | None) -> None:
    err = _error(raw)
    assert err.code == "invalid_request"
    assert "JSON" in err.message
    assert err.job_id == expected_id


def test_non_utf8_keeps_readable_id() -> None:
    err = _error(b'{"id": "job-7", "prompt": "caf\xe9"}')
    assert (err.code, err.job_id) == ("invalid_request", "job-7")
    assert "UTF-8" in err.message


def test_over_size_is_too_long_with_id() -> None:
    raw = _job(id="big-1", prompt="x" * 5000)
    err = _error(raw)
    assert (err.code, err.job_id) == ("too_long", "big-1")
    assert str(LIMIT) in err.message
    assert parse_job(raw, 10_000).prompt == "x" * 5000


@pytest.mark.parametrize("raw", ["[1, 2]", '"prompt"', "42", "null"])
def test_not_an_object(raw: str) -> None:
    err = _error(raw)
    assert err.code == "invalid_request" and "object" in err.message


def test_missing_prompt() -> None:
    err = _error(json.dumps({"id": "j-2", "params": {}}))
    assert (err.code, err.job_id) == ("invalid_request", "j-2")
    assert "exactly one of prompt" in err.message


@pytest.mark.parametrize("extra", [
    {"messages": [{"role": "user", "content": "x"}]},
    {"prompt_token_ids": [1, 2]},
])
def test_doubled_prompt(extra: dict[str, object]) -> None:
    err = _error(_job(**extra))
    assert (err.code, err.job_id) == ("invalid_request", "job-1")
    assert "found: prompt" in err.message


def test_duplicate_json_key_is_rejected_not_guessed() -> None:
    err = _error('{"id": "j-3", "prompt": "a", "prompt": "b"}')
    assert (err.code, err.job_id) == ("invalid_request", "j-3")
    assert "duplicate key 'prompt'" in err.message


@pytest.mark.parametrize("fields, loc", [
    ({"priority": "5"}, "priority"),  # no str -> int coercion
    ({"priority": True}, "priority"),  # no bool as int
    ({"params": {"max_tokens": True}}, "params.max_tokens"),
    ({"params": {"max_tokens": 2.0}}, "params.max_tokens"),
    ({"params": {"temperature": "0.5"}}, "params.temperature"),
    ({"params": {"stop": "a"}}, "params.stop"),
    ({"params": "fast"}, "params"),
    ({"deadline_ms": 1.5}, "deadline_ms"),
    ({"prompt": 123}, "prompt"),
])
def test_wrong_types(fields: dict[str, object], loc: str) -> None:
    err = _error(_job(**fields))
    assert (err.code, err.job_id) == ("invalid_request", "job-1")
    assert err.message.startswith(f"{loc}:"), err.message
    assert "Traceback" not in err.message and "\n" not in err.message


def test_prompt_token_ids_must_be_non_negative_ints() -> None:
    for bad in ([], [1, -2], [1, "2"], [True]):
        err = _error(json.dumps({"id": "t", "prompt_token_ids": bad}))
        assert err.message.startswith("prompt_token_ids"), err.message


def test_messages_shape() -> None:
    err = _error(json.dumps({"id": "m", "messages": [{"role": "user"}]}))
    assert err.message.startswith("messages.0.content"), err.message
    job = parse_job(json.dumps({"messages": [{"role": "user", "content": "hi"}]}), LIMIT)
    assert job.messages is not None and job.messages[0].content == "hi"


@pytest.mark.parametrize("fields, name", [
    ({"tenant": "a"}, "tenant"),
    ({"params": {"max_tokens": 4, "beam_width": 2}}, "params.beam_width"),
])
def test_unknown_field_is_named(fields: dict[str, object], name: str) -> None:
    err = _error(_job(**fields))
    assert err.code == "invalid_request"
    assert err.message.startswith(f"{name}:") and "not permitted" in err.message


@pytest.mark.parametrize("params", [
    {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": MAX_TOKENS_CAP + 1}, {"max_tokens": 10**30},
    {"top_p": 0.0}, {"temperature": -0.1}, {"min_p": 1.5}, {"presence_penalty": 3.0},
    {"repetition_penalty": 0.0}, {"logprobs": 21}, {"seed": -1}, {"stop": [""]},
])
def test_param_bounds(params: dict[str, object]) -> None:
    err = _error(_job(params=params))
    assert err.message.startswith(f"params.{next(iter(params))}"), err.message


def test_non_finite_float_rejected() -> None:
    err = _error('{"prompt": "x", "params": {"temperature": NaN}}')
    assert err.message.startswith("params.temperature")


def test_bad_id_is_an_error_and_not_echoed() -> None:
    err = _error(json.dumps({"id": "a b*", "prompt": "x"}))
    assert err.job_id is None and err.message.startswith("id:")
    assert _error(json.dumps({"id": "x" * 257, "prompt": "x"})).job_id is None


def test_good_job_round_trips() -> None:
    raw = json.dumps({
        "id": "abc-123", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "params": {"max_tokens": 8, "temperature": 0, "top_k": -1, "stop": ["\n"], "stop_token_ids": [2],
                   "seed": 7, "ignore_eos": True, "logprobs": 0},
        "priority": -3, "deadline_ms": 1_900_000_000_000, "result_ttl_s": 60,
    })
    job = parse_job(raw, LIMIT)
    assert job.params.temperature == 0.0 and job.priority == -3
    assert job.params.sampling_kwargs() == {"max_tokens": 8, "temperature": 0.0, "top_k": -1, "stop": ["\n"],
                                             "stop_token_ids": [2], "seed": 7, "ignore_eos": True, "logprobs": 0}
    assert parse_job(job.to_json(), LIMIT) == job
    assert json.loads(job.to_json()) == json.loads(raw)  # nothing added, nothing lost
    assert parse_job(raw.encode(), LIMIT) == job


def test_minimal_job_defaults() -> None:
    job = parse_job('{"prompt_token_ids": [0, 5, 9]}', LIMIT)
    assert job.id is None and job.priority == 0 and job.params == Params()
    assert job.params.sampling_kwargs() == {}
    assert Job(prompt="x").to_json() == '{"prompt":"x","params":{},"priority":0}'


def test_events_round_trip_and_discriminate() -> None:
    events: list[TokenEvent | DoneEvent | ErrorEvent] = [
        TokenEvent(index=0, token_ids=[5, 6], text="he"),
        DoneEvent(finish_reason="length", text="he", token_ids=[5, 6],
                  usage={"prompt_tokens": 3, "completion_tokens": 2}),  # type: ignore[arg-type]
        ErrorEvent(code="expired", message="deadline passed"),
    ]
    for event in events:
        parsed = parse_event(dump_event(event))
        assert type(parsed) is type(event) and parsed == event
    assert [parse_event(dump_event(e)).is_final for e in events] == [False, True, True]
    assert json.loads(dump_event(events[0])) == {"type": "token", "index": 0, "token_ids": [5, 6], "text": "he"}


def test_event_parsing_tolerates_new_fields_but_not_bad_ones() -> None:
    raw = '{"type": "token", "index": 2, "token_ids": [1], "text": "a", "ttft_ms": 12}'
    assert parse_event(raw.encode()) == TokenEvent(index=2, token_ids=[1], text="a")
    for bad in ('{"type": "bogus"}', '{"type": "done", "finish_reason": "abort", "text": "", "token_ids": [],'
                ' "usage": {"prompt_tokens": 1, "completion_tokens": 0}}', '{"type": "error", "code": "oops",'
                ' "message": ""}', "nope"):
        with pytest.raises(ValueError, match="malformed event"):
            parse_event(bad)


SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": ["x", "y"]}},
          "required": ["b", "a"]}


@pytest.mark.parametrize(("params", "expected"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}},
     {"kind": "json_schema", "spec": json.dumps(SCHEMA, separators=(",", ":"))}),
    ({"response_format": {"type": "json_object"}}, {"kind": "json_object", "spec": ""}),
    ({"response_format": {"type": "text"}}, None),
    ({"regex": "[a-z]+"}, {"kind": "regex", "spec": "[a-z]+"}),
    ({"choice": ["yes", "ça"]}, {"kind": "choice", "spec": '["yes", "ça"]'}),
])
def test_structured_output_params_become_one_engine_grammar(params: dict, expected: dict | None) -> None:
    job = parse_job(_job(params=params))
    kwargs = job.params.sampling_kwargs()
    assert kwargs.get("structured_output") == expected
    assert not {"response_format", "regex", "choice"} & set(kwargs)
    assert parse_job(job.to_json()) == job  # the wire form round-trips (the "schema" key included)
    # The schema's key order survives: the output lists properties in that order.
    if expected is not None and expected["kind"] == "json_schema":
        assert list(json.loads(expected["spec"])["properties"]) == ["b", "a"]


@pytest.mark.parametrize(("params", "message"), [
    ({"regex": "a+", "choice": ["a"]}, "at most one of response_format, regex, choice"),
    ({"response_format": {"type": "json_object"}, "regex": "a"}, "at most one of"),
    ({"response_format": {"type": "json_schema"}}, "json_schema is required with type json_schema"),
    ({"response_format": {"type": "json_object", "json_schema": {"schema": {}}}}, "only there"),
    ({"response_format": {"type": "xml"}}, "params.response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}}}, "extra"),
    ({"choice": []}, "params.choice"),
    ({"choice": ["a", ""]}, "params.choice.1"),
    ({"regex": ""}, "params.regex"),
])
def test_bad_structured_output_params_name_the_field(params: dict, message: str) -> None:
    error = _error(_job(params=params))
    assert error.code == "invalid_request" and message in error.message, error.message


def test_a_job_records_its_user_and_api_key_name() -> None:
    job = parse_job(_job(user="u-42", api_key_id="team-a"))
    assert (job.user, job.api_key_id) == ("u-42", "team-a")
    assert _error(_job(user="u" * 300)).message.startswith("user:")


def test_import_api_client_leaves_torch_out() -> None:
    code = "import sys, api_client, api_client.__main__; print('torch' in sys.modules, 'engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["False", "False"]
