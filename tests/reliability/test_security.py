"""The claims of docs/security.md, each backed here: an ACL user with a password and rediss:// TLS reach the
worker unchanged, no pickle (Celery JSON only), size caps, result TTLs, and nothing in a job makes the
worker open a file, import a module or run a process (checked with a CPython audit hook)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import NoPermissionError

from api_client.schema import DEFAULT_MAX_JOB_BYTES, Job, JobError, parse_job
from tests.helpers.redis_server import RedisServer, _free_port
from tests.reliability.conftest import KEYS, WorkerProcess, wait_until
from tests.worker.conftest import REPO_ROOT, InProcessWorker, settings_for, submit, wait_final, worker_env

pytestmark = pytest.mark.reliability

PASSWORD = "s3cret-Pw_for-relay"
# The least-privilege ACL of docs/security.md: the worker's keys only, stream and scripting commands, a few
# string/key commands; nothing @dangerous (FLUSHALL, CONFIG, KEYS, DEBUG, ...).
WORKER_ACL = ("on >{password} ~{prefix}:* resetchannels -@all +@stream +evalsha +eval +script|load "
              "+script|exists +get +set +del +mget +exists +expire +pexpire +ttl +pttl +scan +ping +hello "
              "+auth +select +zadd +zrem +zremrangebyscore")
SOURCE_DIRS = ("engine", "kernels", "worker", "api_client", "bench")


def openssl_certs(out: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1: (ca.crt, server.crt, server.key)."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS test needs the openssl command")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=tokenrelay-test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (out / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return out / "ca.crt", out / "server.crt", out / "server.key"


def client_users(client: Any) -> list[tuple[str, int]]:
    """(ACL user, local port) of every client connection but the one asking."""
    me = client.client_id()
    return [(c["user"], int(c["laddr"].rsplit(":", 1)[1])) for c in client.client_list() if int(c["id"]) != me]


def test_acl_user_over_tls_reaches_the_worker_unchanged(tmp_path: Path,
                                                        workers: Callable[..., WorkerProcess]) -> None:
    ca, cert, key = openssl_certs(tmp_path)
    tls_port = _free_port()
    try:
        server = RedisServer(extra_args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                                         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                                         "--tls-auth-clients", "no"])
    except RuntimeError as exc:
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    with server:
        admin: Any = server.client()
        admin.execute_command("ACL", "SETUSER", "relay", *WORKER_ACL.format(password=PASSWORD,
                                                                            prefix=KEYS.prefix).split())
        url = f"rediss://relay:{PASSWORD}@localhost:{tls_port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
        worker = workers(url, "w-tls", result_ttl_s=120)
        submit(admin, "over-tls", prompt="hello", params={"max_tokens": 4, "temperature": 0})
        evs = wait_final(admin, "over-tls", timeout_s=120)
        assert evs[-1].type == "done" and len(evs[-1].token_ids) == 4, worker.logs()[-3000:]
        # Every worker connection is the ACL user, over the TLS port.
        users = client_users(admin)
        assert users and all(user == "relay" and port == tls_port for user, port in users), users
        # The worker's own ACL denies what it does not need.
        relay: Any = server.client(username="relay", password=PASSWORD)
        with pytest.raises(NoPermissionError):
            relay.flushall()
        with pytest.raises(NoPermissionError):
            relay.set("other:key", "x")
        # `--check` works with the same URL, and a wrong password fails without printing the password.
        env = worker_env(url, None, consumer="w-tls")
        check = subprocess.run([sys.executable, "-m", "worker", "--check"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        env["TOKENRELAY_REDIS_URL"] = url.replace(PASSWORD, "wrong-password-xyz")
        check = subprocess.run([sys.executable, "-m", "worker", "--check"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 1
        assert "wrong-password-xyz" not in check.stdout + check.stderr
        assert worker.stop() == 0, worker.logs()[-6000:]


def test_redis_urls_pass_through_settings_to_redis_py_unchanged(model_dir: Path) -> None:
    from redis.asyncio.connection import SSLConnection

    from engine import EngineConfig
    from engine.async_engine import AsyncEngine
    from worker.app import Worker

    engine = AsyncEngine(EngineConfig(model=str(model_dir), num_kv_blocks=16, max_num_seqs=4,
                                      max_num_batched_tokens=64, max_model_len=64))
    url = "rediss://relay:p%40ss@redis.internal:6380/2?ssl_ca_certs=/etc/ssl/ca.pem&ssl_cert_reqs=required"
    settings = settings_for(url, model_dir)
    assert settings.redis_url == url
    pool = Worker(settings, engine=engine).redis.connection_pool
    kwargs = pool.connection_kwargs
    assert pool.connection_class is SSLConnection
    assert (kwargs["username"], kwargs["password"], kwargs["host"], kwargs["port"], kwargs["db"]) == (
        "relay", "p@ss", "redis.internal", 6380, 2)
    assert kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem" and kwargs["ssl_cert_reqs"] == "required"
    with pytest.raises(ValueError, match="redis_url must start with"):
        settings_for("http://relay:pw@host/0", model_dir)


def test_no_pickle_anywhere_and_celery_is_json_only() -> None:
    banned = re.compile(r"\b(import (c?pickle|dill|cloudpickle|marshal|shelve)|from (c?pickle|dill|cloudpickle|"
                        r"marshal|shelve) import|pickle\.loads?|torch\.load\(|trust_remote_code\s*=\s*True|"
                        r"(?<![.\w])eval\(|(?<![.\w])exec\(|__import__\(|import_module\()")
    hits = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if banned.search(line.split("#", 1)[0]):
                    hits.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert hits == []

    from api_client.celery import JSON_ONLY
    from worker.celery_door import make_celery_app

    assert JSON_ONLY == {"task_serializer": "json", "result_serializer": "json", "accept_content": ["json"],
                         "result_accept_content": ["json"]}
    conf = make_celery_app(broker_url="redis://127.0.0.1:1/0").conf
    assert list(conf.accept_content) == ["json"] and conf.task_serializer == "json"
    assert list(conf.result_accept_content) == ["json"]


def test_size_caps_reject_before_parsing() -> None:
    from worker.settings import WorkerSettings

    assert WorkerSettings.model_fields["max_job_bytes"].default == DEFAULT_MAX_JOB_BYTES == 1 << 20
    big = json.dumps({"id": "big", "prompt": "x" * DEFAULT_MAX_JOB_BYTES}).encode()
    with pytest.raises(JobError) as err:
        parse_job(big)
    assert (err.value.code, err.value.job_id) == ("too_long", "big")
    # Far over the cap, the payload is not even parsed to find its id.
    with pytest.raises(JobError) as err:
        parse_job(b'{"id": "huge", "prompt": "' + b"x" * (65 << 20) + b'"}')
    assert (err.value.code, err.value.job_id) == ("too_long", None)
    for params in ({"max_tokens": 10**7}, {"stop": ["s"] * 65}, {"logprobs": 21}):
        with pytest.raises(JobError, match="params"):
            parse_job(json.dumps({"prompt": "a", "params": params}))


def test_result_streams_expire(redis_server: RedisServer, model_dir: Path,
                               start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    start_worker(settings_for(redis_server.url, model_dir, result_ttl_s=300))
    submit(client, "ttl-default", prompt="hello", params={"max_tokens": 2})
    submit(client, "ttl-own", prompt="hello", params={"max_tokens": 2}, result_ttl_s=20)
    submit(client, "ttl-bad", prompt=42)  # an error event expires too
    for job_id in ("ttl-default", "ttl-own", "ttl-bad"):
        wait_final(client, job_id)
    assert 250 < client.ttl(KEYS.result("ttl-default")) <= 300
    assert 0 < client.ttl(KEYS.result("ttl-own")) <= 20
    assert 250 < client.ttl(KEYS.result("ttl-bad")) <= 300
    with pytest.raises(JobError, match="result_ttl_s"):
        parse_job(json.dumps({"prompt": "a", "result_ttl_s": 31 * 24 * 3600}))


def test_job_fields_are_data_only() -> None:
    """The schema has no field that names a file, a module, a model or code; unknown fields are errors."""
    assert set(Job.model_fields) == {"id", "prompt", "messages", "prompt_token_ids", "params", "priority",
                                     "deadline_ms", "result_ttl_s", "user", "api_key_id", "lane"}
    for extra in ({"model": "/etc/passwd"}, {"tokenizer": "/tmp/x"}, {"chat_template": "{{ x }}"},
                  {"trust_remote_code": True}, {"params": {"logits_processors": ["os.system"]}}):
        with pytest.raises(JobError, match="Extra inputs are not permitted"):
            parse_job(json.dumps({"prompt": "a", **extra}))
    with pytest.raises(JobError, match="id"):
        parse_job(json.dumps({"id": "../../etc/passwd", "prompt": "a"}))


def test_acknowledged_jobs_do_not_pile_up_in_the_queue(redis_server: RedisServer, model_dir: Path,
                                                       start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    start_worker(settings_for(redis_server.url, model_dir, metrics_interval_s=0.2, lease_s=1))
    job_ids = [f"trim-{i}" for i in range(20)]
    for job_id in job_ids:
        submit(client, job_id, prompt="hello", params={"max_tokens": 1})
    for job_id in job_ids:
        wait_final(client, job_id)
    assert client.xpending(KEYS.jobs, KEYS.group)["pending"] == 0
    # Every entry is served and acknowledged: a few maintenance intervals later they should be gone.
    wait_until(lambda: client.xlen(KEYS.jobs) < len(job_ids), timeout_s=5, what="acknowledged entries trimmed")
