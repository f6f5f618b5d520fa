"""Session-wide fixtures: the real Redis servers that the G4 tests share.

``redis_server`` is one standalone ``redis-server`` and ``redis_cluster`` a three-master Redis
Cluster, both started on free ports of 127.0.0.1 on first use and stopped at the end of the
session. Tests that share them keep apart by giving each ``RedisTier`` its own namespace.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_servers import RedisClusterServers, RedisServer, start_redis_cluster, start_redis_server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with start_redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    with start_redis_cluster() as cluster:
        yield cluster
