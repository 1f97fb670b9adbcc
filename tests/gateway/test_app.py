"""The gateway app in process (FastAPI's TestClient, a real redis-server, no worker): key parsing, the
loopback-only default, /health and /metrics, and that importing it never pulls in torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api_client.gateway import GatewaySettings, create_app
from api_client.gateway.metrics import GatewayMetrics
from api_client.gateway.settings import is_loopback
from tests.helpers.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def _client(redis_server: RedisServer, **settings: Any) -> TestClient:
    return TestClient(create_app(GatewaySettings(redis_url=redis_server.url, prefix="apptest", **settings)))


def test_api_keys_are_named_and_malformed_ones_refused() -> None:
    keys = GatewaySettings(gateway_api_keys=" team-a=sk-1 , sk-2 ,").api_keys()
    assert keys[0].name == "team-a" and keys[1].name.startswith("key-") and len(keys) == 2
    assert b"sk-2" not in keys[1].digest
    for bad in ("=sk-1", "name=", "a=b,=c"):
        with pytest.raises(ValueError, match="gateway_api_keys"):
            GatewaySettings(gateway_api_keys=bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("10.0.0.2")
    assert not is_loopback("testclient") and not is_loopback(None)


def test_without_keys_only_loopback_clients_are_served(redis_server: RedisServer) -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 1}
    with _client(redis_server) as client:  # TestClient's peer is "testclient": not loopback
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 403 and "loopback" in response.json()["error"]["message"]
        assert client.get("/v1/models").status_code == 403
        assert client.get("/health").status_code == 200  # health and metrics stay open
    with _client(redis_server, gateway_allow_unauthenticated=True) as client:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_worker"
        assert response.headers["retry-after"] == "5"


def test_health_and_metrics(redis_server: RedisServer) -> None:
    with _client(redis_server, gateway_api_keys="k=sk-9") as client:
        health = client.get("/health").json()
        assert health == {"status": "ok", "redis": True, "workers": 0, "models": [], "queue_depth": 0}
        assert client.post("/v1/chat/completions", json={}).status_code == 401
        text = client.get("/metrics").text
    assert 'tokenrelay_gateway_requests_total{endpoint="/v1/chat/completions",status="401"} 1.0' in text
    names = {f.name for f in GatewayMetrics().registry.collect()}
    assert all(name in text for name in names)
    redis_server.stop()
    with _client(redis_server) as client:
        response = client.get("/health")
        assert response.status_code == 503 and response.json()["redis"] is False


def test_live_workers_come_from_the_set_or_from_a_scan(redis_server: RedisServer) -> None:
    import json
    import time

    from api_client.keys import Keys

    keys, r = Keys("apptest"), redis_server.client()
    r.set(keys.heartbeat("old-acl"), json.dumps({"model": "m1"}), px=60_000)  # beats, cannot keep the set
    with _client(redis_server) as client:
        assert client.get("/health").json()["models"] == ["m1"]
    r.set(keys.heartbeat("new"), json.dumps({"model": "m2"}), px=60_000)
    r.zadd(keys.heartbeats, {"new": int(time.time() * 1000) + 60_000, "gone": int(time.time() * 1000) - 1})
    with _client(redis_server) as client:  # the set wins when it has live names
        assert client.get("/health").json()["models"] == ["m2"]


def test_importing_the_gateway_leaves_torch_out() -> None:
    code = ("import sys, api_client.gateway, api_client.gateway.__main__, api_client.gateway.app; "
            "print('torch' in sys.modules, 'engine' in sys.modules, 'worker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False", "False"]


def test_bad_settings_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "api_client.gateway"], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "TOKENRELAY_GATEWAY_PORT": "70000"}, timeout=60)
    assert proc.returncode == 2 and "gateway_port" in proc.stderr


def test_the_batch_api_is_refused_in_the_tagged_layout(redis_server: RedisServer) -> None:
    with _client(redis_server, gateway_allow_unauthenticated=True, queue_shards=2) as client:
        for response in (client.get("/v1/batches"),
                         client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", b"{}\n")})):
            error = response.json()["error"]
            assert response.status_code == 501 and error["code"] == "unsupported_layout", error
            assert "shard" in error["message"]
