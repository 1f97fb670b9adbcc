"""A real Redis Cluster for tests: 3 masters + 3 replicas (redis-server --cluster-enabled yes) on loopback
ports, joined with `redis-cli --cluster create --cluster-replicas 1`, ready once every node reports
cluster_state:ok. `kill_master` SIGKILLs a master, as a crash would; its replica takes over after
cluster-node-timeout."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.cluster import RedisCluster as SyncRedisCluster

from tests.helpers.redis_server import RedisServer

# The cluster bus listens on port + 10000, so data ports stay below 65536 - 10000; this range also
# stays clear of Linux's ephemeral ports (32768+), which the other tests' servers use.
PORT_RANGE = (21000, 31000)
READY_TIMEOUT_S = 30.0
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: a dead master's replica is promoted about this long after


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """`count` ports p, each with p + 10000 (its bus port) free too."""
    ports: list[int] = []
    candidates = list(range(*PORT_RANGE))
    random.shuffle(candidates)
    for port in candidates:
        if port not in ports and port + 10000 not in ports and _is_free(port) and _is_free(port + 10000):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free port pairs in {PORT_RANGE}")


class LocalCluster:
    """`num_masters` masters with `replicas` replicas each, in one temp dir; `url` names one node."""

    def __init__(self, num_masters: int = 3, replicas: int = 1, node_timeout_ms: int = NODE_TIMEOUT_MS,
                 extra_args: tuple[str, ...] = ()) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not on PATH (apt-get install -y redis-tools / redis-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="tokenrelay-cluster-"))
        self.nodes: list[RedisServer] = []
        num_nodes = num_masters * (1 + replicas)
        for attempt in range(3):
            try:
                self._start_nodes(num_nodes, node_timeout_ms, extra_args)
                break
            except RuntimeError:  # a port taken between the probe and the bind: pick others
                self._stop_nodes()
                if attempt == 2:
                    raise
        try:
            if num_masters >= 3:
                addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
                proc = subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas",
                                       str(replicas), "--cluster-yes"], capture_output=True, text=True, timeout=60)
                if proc.returncode != 0:
                    raise RuntimeError(f"redis-cli --cluster create failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            else:
                self._join_by_hand(num_masters, replicas)
            self.wait_ok()
            self._first_slots = {port: slot for slot, port in self._slot_owners().items()}
        except BaseException:
            self.close()
            raise

    def _join_by_hand(self, num_masters: int, replicas: int) -> None:
        """redis-cli refuses fewer than 3 masters: split the slots evenly and MEET (benchmarks only)."""
        if replicas:
            raise ValueError("fewer than 3 masters is for benchmarks: replicas=0 only")
        bounds = [i * 16384 // num_masters for i in range(num_masters + 1)]
        for i, node in enumerate(self.nodes):
            client = node.client()
            try:
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
                if i:
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
            finally:
                client.close()

    def _start_nodes(self, num_nodes: int, node_timeout_ms: int, extra_args: tuple[str, ...]) -> None:
        for i, port in enumerate(free_cluster_ports(num_nodes)):
            node_dir = self.dir / f"node-{i}"
            self.nodes.append(RedisServer(port=port, dir=node_dir, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # A replica syncs at once (default: a 5 s wait for more replicas); until it has, it
                # cannot take over, so a fresh cluster killed early would stay down.
                "--repl-diskless-sync-delay", "0", *extra_args)))

    @property
    def url(self) -> str:
        node = next(n for n in self.nodes if n.is_running)
        return f"redis://127.0.0.1:{node.port}/0"

    def client(self, **kwargs: Any) -> SyncRedisCluster:
        kwargs.setdefault("socket_timeout", 10.0)
        node = next(n for n in self.nodes if n.is_running)
        return SyncRedisCluster(host="127.0.0.1", port=node.port, **kwargs)

    def info(self, node: RedisServer, section: str) -> dict[str, str]:
        """CLUSTER INFO (section "cluster") or INFO <section> of one node, as a dict of strings."""
        client = node.client(socket_connect_timeout=1.0, socket_timeout=2.0)
        try:
            raw = client.execute_command("CLUSTER", "INFO") if section == "cluster" else \
                client.execute_command("INFO", section)
        finally:
            client.close()
        if isinstance(raw, dict):
            return {str(k): str(v) for k, v in raw.items()}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}

    def _replicas_in_sync(self) -> bool:
        for node in self.nodes:
            if node.is_running:
                info = self.info(node, "replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
        return True

    def wait_ok(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Every running node reports cluster_state:ok and knows every slot, and every replica is in
        sync with its master (only then can it take over)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                states = [self.info(n, "cluster") for n in self.nodes if n.is_running]
                if all(s.get("cluster_state", "").strip() == "ok" and s.get("cluster_slots_ok", "").strip() == "16384"
                       for s in states) and self._replicas_in_sync():
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach cluster_state:ok within {timeout_s} s")
            time.sleep(0.1)

    def wait_failover(self, dead: RedisServer, timeout_s: float = READY_TIMEOUT_S) -> RedisServer:
        """Wait until a replica has taken over every slot of the `dead` master and every running node is
        ok again; returns the new master."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                owners = self._slot_owners()
                if owners and dead.port not in owners.values() and len(owners) >= 1:
                    self.wait_ok(max(0.1, deadline - time.monotonic()))
                    return next(n for n in self.nodes if n.port == self._promoted(dead))
            except (redis.ConnectionError, redis.TimeoutError, StopIteration):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"no replica took over the slots of the master on port {dead.port} within {timeout_s} s")

    def _promoted(self, dead: RedisServer) -> int:
        """The port of the master that serves the first slot `dead` served when the cluster was made."""
        return self._slot_owners()[self._first_slots[dead.port]]

    def _slot_owners(self) -> dict[int, int]:
        """First slot of each range -> master port, as a running node sees it."""
        node = next(n for n in self.nodes if n.is_running)
        client = node.client(socket_timeout=2.0)
        try:
            slots = client.execute_command("CLUSTER", "SLOTS")
        finally:
            client.close()
        return {int(r[0]): int(r[2][1]) for r in slots}

    def master_of(self, key: str) -> RedisServer:
        """The running node that serves `key`'s slot now."""
        client = self.client()
        try:
            node = client.get_node_from_key(key)
            port = int(node.port)
        finally:
            client.close()
        return next(n for n in self.nodes if n.port == port)

    def masters(self) -> list[RedisServer]:
        out = []
        for node in self.nodes:
            if not node.is_running:
                continue
            client = node.client(socket_timeout=2.0)
            try:
                role = client.execute_command("ROLE")[0]
            finally:
                client.close()
            if (role.decode() if isinstance(role, bytes) else role) == "master":
                out.append(node)
        return out

    def kill_master(self, key: str) -> RedisServer:
        """SIGKILL the master of `key`'s slot; returns it (dead)."""
        node = self.master_of(key)
        node.kill()
        return node

    def _stop_nodes(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def close(self) -> None:
        self._stop_nodes()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
