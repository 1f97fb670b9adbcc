"""Two gateway replicas on one queue: one killed mid-stream loses nothing. Its job still finishes
(nothing cancels it), another client reads the whole result from Redis, and the other replica serves
on."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import openai

from api_client import Client
from tests.gateway.conftest import Gateway
from tests.worker.conftest import PREFIX


def test_a_killed_replica_loses_no_job(gateway_worker: subprocess.Popen[bytes], gateway_redis: Any,
                                       start_gateway: Callable[..., Gateway], served_model_name: str) -> None:
    first, second = start_gateway(), start_gateway()  # no keys: loopback clients only
    body = {"model": served_model_name, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stream": True}
    streamed: list[str] = []
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{first.url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        job_id = response.headers["x-tokenrelay-job-ids"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                streamed.append(line)
            if len(streamed) == 3:
                first.kill()  # SIGKILL: no shutdown code runs
                break
    assert first.process.returncode is not None
    with Client(gateway_redis.url, prefix=PREFIX) as client:
        result = client.result(job_id, timeout=600)
    assert result.finish_reason == "length" and result.usage.completion_tokens == 40
    # The other replica serves on, and the same greedy request through it gives the same text.
    again = openai.OpenAI(base_url=f"{second.url}/v1", api_key="unused", max_retries=0).completions.create(
        model=served_model_name, prompt="Once upon a time", max_tokens=40, temperature=0,
        extra_body={"ignore_eos": True})
    assert again.choices[0].text == result.text
