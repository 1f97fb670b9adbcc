"""Structured outputs through the OpenAI door, on the embedded real model: `response_format` json_schema
(20 prompts, nested objects, enums and arrays, every output validated with jsonschema), json_object
(every output parses), the SDK's `parse` with a pydantic model, and tokenrelay's `regex` / `choice`."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import jsonschema
import pydantic

# Nested objects, enums and arrays; bounded strings, arrays and numbers keep the outputs short. A
# pattern, not maxLength, bounds the string: xgrammar's maxLength strings admit raw control characters.
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "species": {"enum": ["cat", "dog", "fox", "owl"]},
        "owner": {"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "city": {"enum": ["Paris", "Lyon", "Nice"]}}, "required": ["age", "city"],
            "additionalProperties": False},
        "toys": {"type": "array", "items": {"enum": ["ball", "rope"]}, "maxItems": 2},
    },
    "required": ["name", "species", "owner", "toys"],
    "additionalProperties": False,
}
PROMPTS = [f"Describe pet number {i} as JSON." for i in range(20)]


def _chat(client: Any, model: str, content: str, max_tokens: int = 200, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, **kwargs)


def test_every_json_schema_output_parses_and_validates(openai_client: Any, served_model_name: str) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: the worker batches them
        outs = list(pool.map(lambda i: _chat(openai_client, served_model_name, PROMPTS[i], seed=i,
                                             temperature=[0.0, 0.8][i % 2], response_format=response_format),
                             range(len(PROMPTS))))
    for out in outs:
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PET_SCHEMA)
    assert len({out.choices[0].message.content for out in outs}) > 1


def test_json_object_always_parses(openai_client: Any, served_model_name: str) -> None:
    cities = ["Paris", "Rome", "Madrid", "Berlin", "Lisbon"]
    with ThreadPoolExecutor(10) as pool:
        outs = list(pool.map(lambda i: _chat(openai_client, served_model_name,
                                             f'Give the JSON object {{"city": ..., "country": ...}} for {cities[i // 2]}.',
                                             seed=i, temperature=[0.0, 0.7][i % 2], max_tokens=100,
                                             response_format={"type": "json_object"}), range(10)))
    for out in outs:
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_streamed_json_schema_output_validates(openai_client: Any, served_model_name: str) -> None:
    chunks = _chat(openai_client, served_model_name, PROMPTS[0], temperature=0, stream=True,
                   response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PET_SCHEMA)


class Toy(pydantic.BaseModel):
    kind: Literal["ball", "rope"]
    is_new: bool


class Pet(pydantic.BaseModel):
    species: Literal["cat", "dog"]
    age: Literal[1, 2, 3]
    toy: Toy


def test_the_sdk_parse_helper_gets_its_pydantic_model(openai_client: Any, served_model_name: str) -> None:
    out = openai_client.chat.completions.parse(model=served_model_name, max_tokens=100, temperature=0,
                                               messages=[{"role": "user", "content": "A pet?"}], response_format=Pet)
    assert isinstance(out.choices[0].message.parsed, Pet)


def test_regex_and_choice_through_extra_body(openai_client: Any, served_model_name: str) -> None:
    out = _chat(openai_client, served_model_name, "A code?", temperature=1.0, seed=3,
                extra_body={"regex": "[A-Z]{3}-[0-9]{2,4}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2,4}", out.choices[0].message.content)
    choices = ["yes", "no", "perhaps not"]
    out = openai_client.completions.create(model=served_model_name, prompt="Is it?", max_tokens=10, n=4,
                                           temperature=1.0, seed=5, extra_body={"choice": choices})
    assert all(c.text in choices and c.finish_reason == "stop" for c in out.choices)
