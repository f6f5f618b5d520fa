"""Real ``redis-server`` processes for the tests: standalone servers and Redis Clusters.

Operations, in the order a test uses them:

1. ``start_redis_server()`` / ``start_redis_cluster()`` — start processes on free ports of
   127.0.0.1 (never the Redis an operator runs on 6379), with persistence off and their files in
   a temporary directory, and wait until they answer (``cluster_state:ok`` on every node and
   replicas in sync). ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT) make a server hang;
   ``kill()`` (SIGKILL) makes it die mid-run, and ``restart_redis_server(server)`` starts it
   again on the same port, in the same directory, with the same arguments (a cluster node
   rejoins from its ``nodes.conf``, with no data: persistence is off).
2. ``corrupt_redis_block(url, cluster, tier, key)`` — flip one stored payload byte behind a
   ``RedisTier``'s back, the way bit rot or a buggy writer would.
3. ``.stop()`` — terminate (SIGCONT first, in case a test left a server stopped) and clean up.

The binaries come from PATH (``redis-server``, ``redis-cli``); no Docker, no mocks.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis
import redis.asyncio
import redis.asyncio.cluster

from kvstore.core.block_format import HEADER_BYTES
from tiers.redis_store import RedisTier, parse_manifest

__all__ = [
    "RedisClusterServers",
    "RedisServer",
    "corrupt_redis_block",
    "free_port",
    "restart_redis_server",
    "start_redis_cluster",
    "start_redis_server",
]

READY_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 5.0
_START_ATTEMPTS = 5


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


@dataclass
class RedisServer:
    """One running ``redis-server``; ``url`` is what ``RedisTierConfig.url`` takes."""

    port: int
    proc: subprocess.Popen[bytes]
    dir: Path
    owns_dir: bool = True
    args: tuple[str, ...] = ()
    """The ``extra_args`` it was started with, for ``restart_redis_server``."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain synchronous client of this one server (for CONFIG, INFO, raw keys)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=READY_TIMEOUT_S)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its socket open but answers nothing, like a hung server."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap: the server dies mid-run, as in a crash, and keeps its directory."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            # A stopped process would hold SIGTERM until it is continued.
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class RedisClusterServers:
    """Three (or more) masters of one Redis Cluster; ``url`` names the first as startup node."""

    servers: list[RedisServer]
    dir: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        return [s.proc for s in self.servers]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def masters(self) -> list[RedisServer]:
        """The servers that are masters now (a failover changes the answer)."""
        out = []
        for server in self.servers:
            if server.proc.poll() is not None:
                continue
            client = server.client()
            try:
                if client.info("replication")["role"] == "master":
                    out.append(server)
            finally:
                client.close()
        return out

    def restart(self, server: RedisServer) -> RedisServer:
        """``restart_redis_server`` for one of ours (killed or stopped), put in its place; waits
        until every node reports ``cluster_state:ok`` again."""
        i = self.servers.index(server)
        self.servers[i] = restart_redis_server(server)
        _wait_cluster_ok(self)
        return self.servers[i]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not on PATH; the G4 tests need a real Redis")
    return path


def _wait_ready(server: RedisServer, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    client = redis.Redis(
        host="127.0.0.1", port=server.port, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    try:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server on port {server.port} exited with {server.proc.returncode}: "
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                # Checking the pid catches another server that took the port first: ours then
                # fails to bind and exits, but the PING would still be answered.
                if client.ping() and int(client.info("server")["process_id"]) == server.proc.pid:
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server on port {server.port} did not answer PING within "
                    f"{READY_TIMEOUT_S} s"
                )
            time.sleep(0.02)
    finally:
        client.close()


def start_redis_server(
    *extra_args: str, port: int | None = None, workdir: Path | None = None
) -> RedisServer:
    """Start a standalone ``redis-server`` on 127.0.0.1 and wait for PING.

    ``extra_args`` are passed on (``"--cluster-enabled", "yes"``, ...). Without ``port`` a free
    one is chosen, and another one if it was taken between choosing and binding; with ``port``
    (to restart a server where its clients expect it) there is one attempt.
    """
    owns_dir = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="kvstore-redis-")) if workdir is None else workdir
    last_error: Exception | None = None
    for _ in range(1 if port is not None else _START_ATTEMPTS):
        chosen = port if port is not None else free_port()
        log_path = directory / f"redis-{chosen}.log"
        args = [
            _redis_server_binary(),
            "--port",
            str(chosen),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(log_path),
            "--daemonize",
            "no",
            *extra_args,
        ]
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = RedisServer(
            port=chosen, proc=proc, dir=directory, owns_dir=owns_dir, args=tuple(extra_args)
        )
        try:
            _wait_ready(server, log_path)
            return server
        except RuntimeError as exc:
            last_error = exc
            server.owns_dir = False
            server.stop()
    if owns_dir:
        shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError(f"could not start redis-server: {last_error}")


def restart_redis_server(server: RedisServer) -> RedisServer:
    """Start a server that was killed or stopped again: same port, directory and arguments (a
    cluster node reads its ``nodes.conf`` and rejoins its cluster). The old object's directory
    now belongs to the new one."""
    if server.proc.poll() is None:
        raise RuntimeError(f"redis-server on port {server.port} is still running")
    restarted = start_redis_server(*server.args, port=server.port, workdir=server.dir)
    restarted.owns_dir = server.owns_dir
    server.owns_dir = False
    return restarted


def start_redis_cluster(
    num_masters: int = 3,
    *,
    replicas: int = 0,
    node_timeout_ms: int = 5000,
    extra_args: Sequence[str] = (),
) -> RedisClusterServers:
    """Start ``num_masters * (1 + replicas)`` cluster-enabled servers, join them with
    ``redis-cli --cluster create``, and wait until every node reports ``cluster_state:ok`` and
    every replica is in sync with its master. ``node_timeout_ms`` is how long a silent master
    has before its replica takes over; ``extra_args`` go to every server (for instance
    ``("--cluster-require-full-coverage", "no")``, so that the other masters keep answering
    for their slots while one master without a replica is down)."""
    directory = Path(tempfile.mkdtemp(prefix="kvstore-redis-cluster-"))
    servers: list[RedisServer] = []
    cluster = RedisClusterServers(servers=servers, dir=directory)
    try:
        for i in range(num_masters * (1 + replicas)):
            # The cluster bus needs a second port; Redis 7 takes it explicitly, so it need not
            # be port + 10000 (which may be out of range or taken).
            node_dir = directory / f"node{i}"
            node_dir.mkdir()
            bus_port = free_port()
            servers.append(
                start_redis_server(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-port",
                    str(bus_port),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    # Replicas sync at once instead of after the default 5 s of batching.
                    "--repl-diskless-sync-delay",
                    "0",
                    *extra_args,
                    workdir=node_dir,
                )
            )
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH; it is needed to create the cluster")
        create = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in cluster.ports),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({create.returncode}): "
                f"{create.stdout.decode(errors='replace')[-2000:]}"
                f"{create.stderr.decode(errors='replace')[-2000:]}"
            )
        _wait_cluster_ok(cluster)
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _wait_cluster_ok(cluster: RedisClusterServers) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(cluster.servers)
    while pending:
        server = pending[0]
        client = server.client()
        try:
            # redis-py parses CLUSTER INFO and INFO into dicts.
            info = client.cluster("INFO")
            replication = client.info("replication")
        finally:
            client.close()
        if (
            isinstance(info, dict)
            and info.get("cluster_state") == "ok"
            and info.get("cluster_known_nodes") == str(len(cluster.servers))
            and (replication["role"] == "master" or replication["master_link_status"] == "up")
        ):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"cluster node on port {server.port} is not ready after {READY_TIMEOUT_S} s: "
                f"{info} {replication}"
            )
        time.sleep(0.05)


async def corrupt_redis_block(url: str, cluster: bool, tier: RedisTier, key: bytes) -> None:
    """Flip one byte of ``key``'s stored payload, straight in Redis: the middle byte of chunk 0
    past the block header if the block is chunked, else the middle of the head's payload."""
    client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
    if cluster:
        client = redis.asyncio.cluster.RedisCluster.from_url(url)
    else:
        client = redis.asyncio.Redis.from_url(url)
    try:
        head = tier.head_key(key)
        value = await client.get(head)
        if not isinstance(value, bytes):
            raise KeyError(f"block {key.hex()} is not stored under {head}")
        if parse_manifest(value) is not None:
            target = tier.chunk_key(key, 0)
            stored = await client.get(target)
            if not isinstance(stored, bytes):
                raise KeyError(f"chunk 0 of block {key.hex()} is missing")
        else:
            target, stored = head, value
        if len(stored) <= HEADER_BYTES:
            raise ValueError(f"{target} holds {len(stored)} bytes, no payload to corrupt")
        offset = HEADER_BYTES + (len(stored) - HEADER_BYTES) // 2
        # SETRANGE changes the byte in place and keeps the key's TTL.
        await client.setrange(target, offset, bytes([stored[offset] ^ 0xFF]))
    finally:
        await client.aclose()
