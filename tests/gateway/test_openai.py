"""The official `openai` client against a real gateway, a real worker subprocess and a real redis-server:
chat and completions, streamed and not, `n`, stop, seeds, logprobs, usage, the errors a client sees
(400 naming the field, 401, 404, 503 with Retry-After), and a disconnect cancelling the job."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from api_client import Client, Keys
from api_client.schema import parse_job
from tests.gateway.conftest import API_KEY, Gateway
from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import PREFIX

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}]


def _jobs_by_id(redis_server: RedisServer) -> dict[str, Any]:
    client: Any = redis_server.client()
    return {(job := parse_job(fields[b"job"])).id: job for _, fields in client.xrange(Keys(PREFIX).jobs)}


def test_models_lists_what_the_live_worker_serves(openai_client: Any, served_model_name: str) -> None:
    assert [m.id for m in openai_client.models.list()] == [served_model_name]


def test_chat_streamed_equals_chat_whole_and_reports_usage(openai_client: Any, served_model_name: str) -> None:
    kwargs: dict[str, Any] = {"model": served_model_name, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    whole = openai_client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content and finishes == [choice.finish_reason]
    assert all(c.usage is None for c in chunks[:-1]) and not chunks[-1].choices
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")


def test_completions_match_the_engine_and_stream_the_same(openai_client: Any, served_model_name: str,
                                                          reference: Callable[..., tuple[list[int], str]]) -> None:
    prompt = "The quick brown fox"
    _, expected = reference(prompt, {"max_tokens": 10, "temperature": 0.0})
    whole = openai_client.completions.create(model=served_model_name, prompt=prompt, max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == expected
    streamed = list(openai_client.completions.create(model=served_model_name, prompt=prompt, max_tokens=10,
                                                     temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    finish = "length" if whole.usage.completion_tokens == 10 else "stop"
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason == finish


def test_n_choices_and_seeds_reproduce(openai_client: Any, served_model_name: str) -> None:
    kwargs: dict[str, Any] = {"model": served_model_name, "messages": MESSAGES, "max_tokens": 8,
                              "temperature": 1.0, "n": 3, "seed": 1234}
    first = openai_client.chat.completions.create(**kwargs)
    again = openai_client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice has its own seed
    other = openai_client.chat.completions.create(**{**kwargs, "seed": 99, "n": 1})
    assert other.choices[0].message.content != texts[0]
    # Streamed with n: every choice's chunks arrive, each choice finishes once.
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in range(3)]
    assert streamed == texts


def test_stop_strings_cut_the_output(openai_client: Any, served_model_name: str,
                                     reference: Callable[..., tuple[list[int], str]]) -> None:
    prompt = "Once upon a time"
    _, full = reference(prompt, {"max_tokens": 16, "temperature": 0.0})
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(full) > 10 and stop
    out = openai_client.completions.create(model=served_model_name, prompt=prompt, max_tokens=16, temperature=0,
                                           stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_logprobs_come_back_per_token(openai_client: Any, served_model_name: str) -> None:
    out = openai_client.chat.completions.create(model=served_model_name, messages=MESSAGES, max_tokens=5,
                                                temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.token.startswith("token_id:")
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))  # greedy picks the best


def test_the_job_records_the_key_name_and_the_user(openai_client: Any, served_model_name: str,
                                                   gateway_redis: RedisServer) -> None:
    raw = openai_client.chat.completions.with_raw_response.create(
        model=served_model_name, messages=MESSAGES, max_tokens=2, user="end-user-7")
    job_id = raw.headers["x-tokenrelay-job-ids"]
    assert raw.parse().id == job_id
    job = _jobs_by_id(gateway_redis)[job_id]
    assert (job.api_key_id, job.user) == ("team-a", "end-user-7")
    assert API_KEY not in job.to_json()


@pytest.mark.parametrize(("extra", "param"), [
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"temperature": 7}, "temperature"),
    ({"n": 0}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
])
def test_bad_fields_are_400s_naming_the_field(openai_client: Any, served_model_name: str, extra: dict,
                                              param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model=served_model_name, messages=MESSAGES, max_tokens=2,
                                              extra_body=extra)
    error = info.value.body
    assert error["param"] == param and param.split(".")[0] in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_an_unknown_model_is_404(openai_client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_a_bad_key_is_401_and_no_job_is_made(gateway: Gateway, served_model_name: str,
                                             gateway_redis: RedisServer) -> None:
    before = len(_jobs_by_id(gateway_redis))
    for key in ("sk-wrong", API_KEY + "x", API_KEY[:-1]):
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model=served_model_name, messages=MESSAGES, max_tokens=2)
        assert info.value.body["code"] == "invalid_api_key"
    # No Authorization header at all, and a bad body too: the key is checked first.
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": served_model_name, "bogus": 1})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    bare = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-test-bare", max_retries=0)
    assert bare.completions.create(model=served_model_name, prompt="hi", max_tokens=1).choices
    assert len(_jobs_by_id(gateway_redis)) == before + 1


def test_no_worker_is_503_with_retry_after(start_gateway: Callable[..., Gateway], served_model_name: str) -> None:
    lonely = start_gateway(prefix="nobody-home", gateway_retry_after_s=7)
    client = openai.OpenAI(base_url=f"{lonely.url}/v1", api_key="unused", max_retries=0)  # loopback, no keys
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=served_model_name, messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "7"
    assert info.value.body["code"] == "no_worker"


def test_a_job_no_worker_starts_is_503_and_cancelled(start_gateway: Callable[..., Gateway],
                                                     gateway_redis: RedisServer) -> None:
    """A heartbeat with no worker behind it: the job waits the queue timeout, then 503; a deep queue
    is 503 at once."""
    prefix = "stalled"
    keys = Keys(prefix)
    r: Any = gateway_redis.client()
    r.set(keys.heartbeat("ghost"), json.dumps({"model": "ghost-model"}), px=60_000)
    r.zadd(keys.heartbeats, {"ghost": int(time.time() * 1000) + 60_000})
    stalled = start_gateway(prefix=prefix, gateway_queue_timeout_s=1, gateway_max_queue_depth=1)
    client = openai.OpenAI(base_url=f"{stalled.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="ghost-model", prompt="hi", max_tokens=2)
    assert info.value.status_code == 503 and info.value.body["code"] == "timeout"
    (entry,) = r.xrange(keys.jobs)
    job = parse_job(entry[1][b"job"])
    assert r.get(keys.cancel(job.id)) == b"1" and job.deadline_ms is not None
    r.xadd(keys.jobs, {"job": "{}"})  # two undelivered jobs now: over the depth of 1
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="ghost-model", prompt="hi", max_tokens=2)
    assert info.value.body["code"] == "overloaded" and info.value.response.headers["retry-after"]


def test_a_client_that_disconnects_cancels_its_job(gateway: Gateway, served_model_name: str,
                                                   gateway_redis: RedisServer) -> None:
    body = {"model": served_model_name, "prompt": "Tell me everything", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{gateway.url}/v1/completions", json=body,
            headers={"authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        job_id = response.headers["x-tokenrelay-job-ids"]
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it is generating
    with Client(gateway_redis.url, prefix=PREFIX) as client:
        done = client.result(job_id, timeout=60)
    assert done.finish_reason == "cancelled" and done.usage.completion_tokens < 400
