"""bench/startup.py's phase split: read from the runner's `startup phase=` log lines, the time before
the model load measured from the spawn to the load's start."""

from __future__ import annotations

from datetime import datetime

import pytest

from bench.startup import parse_phases


def test_parse_phases_from_log_lines() -> None:
    spawned_at = datetime(2026, 12, 1, 10, 0, 0).timestamp()
    log = ("2026-12-01 10:00:04,000 INFO worker.app starting\n"
           "2026-12-01 10:00:06,500 INFO engine.model_runner startup phase=model_load s=1.500\n"
           "2026-12-01 10:00:08,000 INFO engine.model_runner startup phase=kv_profile s=1.250\n"
           "2026-12-01 10:00:09,000 INFO engine.model_runner startup phase=graph_capture s=0.900\n")
    phases = parse_phases(log, spawned_at)
    assert phases == pytest.approx({"before_model_load_s": 5.0, "model_load_s": 1.5, "kv_profile_s": 1.25,
                                    "graph_capture_s": 0.9})
