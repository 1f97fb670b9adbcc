"""SamplingParams against the wire schema's Params: the same bounds on every parameter, so a job that
validates at the producer never fails in the engine and the engine refuses nothing the wire allows.

(The two cannot share one declaration: api_client must not import the engine, and the engine must not
import api_client, which pulls in redis.)"""

from __future__ import annotations

from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import ValidationError

from api_client.schema import Params
from engine.sampling_params import SamplingParams

NUMERIC = [name for name, field in Params.model_fields.items()
           if any(isinstance(m, (Ge, Gt, Le, Lt)) for m in field.metadata)]
# Caps only the wire has (far above any use, below int overflow): the engine takes anything larger.
WIRE_ONLY_CAPS = {"max_tokens", "seed"}


def _probes(name: str) -> list[Any]:
    """Each bound of the field, and just inside and outside it; plus a few ordinary values."""
    field = Params.model_fields[name]
    is_int = field.annotation in (int, int | None)
    step = 1 if is_int else 1e-6
    values: list[Any] = [0, 1, 2, -1, 20, 21, 1000]
    for meta in field.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            bound = getattr(meta, attr, None)
            if bound is not None and (name not in WIRE_ONLY_CAPS or attr in ("ge", "gt")):
                values += [bound - step, bound, bound + step]
    return [int(v) if is_int else float(v) for v in values]


def _wire_ok(name: str, value: Any) -> bool:
    try:
        Params(**{name: value})
    except ValidationError:
        return False
    return True


def _engine_ok(name: str, value: Any) -> bool:
    try:
        SamplingParams(**{name: value})
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", NUMERIC)
def test_every_bound_is_the_same_on_the_wire_and_in_the_engine(name: str) -> None:
    assert {"temperature", "top_p", "top_k", "min_p", "logprobs"} <= set(NUMERIC)
    for value in _probes(name):
        assert _wire_ok(name, value) == _engine_ok(name, value), (name, value)
