"""Configuration precedence and errors, and the ``kvstore`` commands run as a user runs them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis_servers import RedisServer

from kvstore.config import load_config, parse_size
from kvstore.core.block_format import Codec
from kvstore.core.errors import ConfigError


def test_defaults_are_g2_and_g3() -> None:
    cfg = load_config(env={})
    assert [name for name, _ in cfg.tiers()] == ["G2", "G3"]
    assert cfg.g3 is not None
    assert cfg.g3.path.endswith("kvstore-data/g3")


def test_the_retired_slot_bytes_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Configs written for fixed-slot memory tiers still start: file, environment and --set.
    f = tmp_path / "kvstore.toml"
    f.write_text('[g2]\ncapacity_bytes = "64MiB"\nslot_bytes = "1MiB"\n')
    with caplog.at_level(logging.WARNING, logger="kvstore.config"):
        cfg = load_config(
            f,
            env={"KVSTORE_G1_ENABLED": "0", "KVSTORE_G2_SLOT_BYTES": "8MiB"},
            overrides={"g1": {"slot_bytes": "2MiB"}},
        )
    assert cfg.g2.capacity_bytes == 64 << 20
    warned = [r.getMessage() for r in caplog.records if "slot_bytes" in r.getMessage()]
    assert len(warned) == 2  # g1 and g2, once each
    assert all("allocate by bytes" in w for w in warned)
    with pytest.raises(ConfigError, match="no such setting"):
        load_config(None, env={"KVSTORE_G2_SLOT_BYTE": "8MiB"})  # a typo is still an error


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "kvstore.toml"
    f.write_text(
        '[g2]\ncapacity_bytes = "64MiB"\nslot_bytes = "1MiB"\n'
        '[g3]\npath = "/from/file"\ncapacity_bytes = 1000000\n'
        '[g4]\nenabled = true\nurl = "redis://file:1/0"\ncodec = "zstd_planes"\n'
    )
    cfg = load_config(f, env={"KVSTORE_G3_PATH": "/from/env", "KVSTORE_G4_TTL_S": "60"})
    assert cfg.g2.capacity_bytes == 64 << 20
    assert not hasattr(cfg.g2, "slot_bytes")  # the old setting is ignored (with a warning)
    assert cfg.g3 is not None
    assert cfg.g3.path == "/from/env"
    assert cfg.g3.capacity_bytes == 1_000_000
    assert cfg.g4 is not None
    assert cfg.g4.url == "redis://file:1/0"
    assert cfg.g4.codec is Codec.ZSTD_PLANES
    assert cfg.g4.ttl_s == 60.0
    cfg = load_config(f, env={"KVSTORE_G3_PATH": "/from/env"}, overrides={"g3": {"path": "/flag"}})
    assert cfg.g3 is not None
    assert cfg.g3.path == "/flag"
    cfg = load_config(f, env={"KVSTORE_G4_ENABLED": "0", "KVSTORE_G3_ENABLED": "off"})
    assert [name for name, _ in cfg.tiers()] == ["G2"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVSTORE_G3_CAPACITY_BYTES": "lots"}, "g3.capacity_bytes: 'lots' is not a size"),
        ({"KVSTORE_G4_URI": "redis://x"}, r"KVSTORE_G4_URI: no such setting in \[g4\]"),
        ({"KVSTORE_SERVER_LISTN": ":1"}, r"KVSTORE_SERVER_LISTN: no such setting in \[server\]"),
        ({"KVSTORE_G2_ENABLED": "no"}, "G2 cannot be disabled"),
        ({"KVSTORE_G4_ENABLED": "maybe"}, "g4.enabled: cannot read 'maybe'"),
        ({"KVSTORE_G2_PIN": "sometimes"}, "g2.pin must be one of"),
        ({"KVSTORE_G4_ENABLED": "1", "KVSTORE_G4_CODEC": "lz4"}, "g4.codec: cannot read 'lz4'"),
        ({"KVSTORE_G2_CAPACITY_BYTES": "0"}, "G2.capacity_bytes must be a positive integer"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_unknown_tables_and_keys_in_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[g5]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown tables"):
        load_config(f, env={})
    f.write_text("[g3]\npth = '/x'\n")
    with pytest.raises(ConfigError, match=r"unknown settings \['pth'\]"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", env={})


def test_parse_size() -> None:
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4 gib") == 4 << 30
    assert parse_size(7) == 7
    with pytest.raises(ConfigError):
        parse_size("-1MiB")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_selfcheck_through_g2_g3_and_g4(tmp_path: Path, redis_server: RedisServer) -> None:
    proc = run_cli(
        "selfcheck",
        "--blocks",
        "4",
        "--set",
        f"g3.path={tmp_path / 'g3'}",
        "--set",
        "g3.capacity_bytes=256MiB",
        "--set",
        "g2.capacity_bytes=64MiB",
        env={
            "KVSTORE_G4_ENABLED": "1",
            "KVSTORE_G4_URL": redis_server.url,
            "KVSTORE_G4_NAMESPACE": "selfcheck",
        },
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for tier in ("G2", "G3", "G4"):
        assert tier in proc.stdout
    assert proc.stdout.count("ok") >= 3
    # The check cleaned up after itself: nothing left in G3 or G4.
    import lmdb

    env = lmdb.open(str(tmp_path / "g3"), max_dbs=4, readonly=True, lock=False)
    with env.begin(db=env.open_db(b"blocks", create=False)) as txn:
        assert txn.stat()["entries"] == 0
    env.close()
    client = redis_server.client()
    assert client.keys("kvstore:selfcheck:*") == []


def test_selfcheck_fails_loudly_when_redis_is_down(tmp_path: Path) -> None:
    from redis_servers import free_port

    proc = run_cli(
        "selfcheck",
        "--blocks",
        "2",
        "--set",
        f"g3.path={tmp_path / 'g3'}",
        "--set",
        "g2.capacity_bytes=64MiB",
        "--set",
        "g4.enabled=true",
        "--set",
        f"g4.url=redis://127.0.0.1:{free_port()}/0",
        "--set",
        "g4.timeout_ms=500",
    )
    assert proc.returncode == 1
    assert "TierUnavailableError" in proc.stdout


def test_config_command_and_bad_flag() -> None:
    proc = run_cli("config", "--set", "g3.path=/data/g3")
    assert proc.returncode == 0, proc.stderr
    assert "/data/g3" in proc.stdout
    proc = run_cli("config", "--set", "g3.capacity_bytes=lots")
    assert proc.returncode != 0
    assert "'lots' is not a size" in proc.stderr
    proc = run_cli("config", "--set", "nonsense")
    assert proc.returncode != 0
    assert "TIER.FIELD=VALUE" in proc.stderr


def test_stats_rebuilds_the_index_from_g3(tmp_path: Path) -> None:
    import asyncio

    import torch

    from kvstore.config import StoreConfig
    from kvstore.core.keys import ModelSpec
    from kvstore.engine.engine import Engine
    from tiers.lmdb_store import LmdbTierConfig
    from tiers.pinned_memory import PinnedTierConfig

    spec = ModelSpec(
        "cli", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=4
    )

    async def fill() -> None:
        cfg = StoreConfig(
            g2=PinnedTierConfig(1 << 20, pin="never", segment_prefix="kvstore-clitest"),
            g3=LmdbTierConfig(str(tmp_path / "g3"), 1 << 24),
        )
        engine = await Engine.open(cfg)
        try:
            tokens = list(range(40))
            await engine.put(
                spec, tokens, torch.zeros((1, 2, 40, 1, 8), dtype=torch.float16), durable=True
            )
        finally:
            await engine.close()

    asyncio.run(fill())
    proc = run_cli(
        "stats",
        "--set",
        f"g3.path={tmp_path / 'g3'}",
        "--set",
        "g2.capacity_bytes=16MiB",
    )
    assert proc.returncode == 0, proc.stderr
    assert "10 blocks indexed" in proc.stdout
    g3_row = next(line for line in proc.stdout.splitlines() if line.startswith("G3"))
    assert g3_row.split("\t")[1] == "10"
