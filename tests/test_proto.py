"""The checked-in generated code is exactly what the pinned grpcio-tools makes of the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated = sorted(p.name for p in (tmp_path / "kvstore" / "v1").iterdir())
    assert generated == ["kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py"]
    for name in generated:
        fresh = (tmp_path / "kvstore" / "v1" / name).read_text()
        checked_in = (ROOT / "kvstore" / "v1" / name).read_text()
        assert fresh == checked_in, f"kvstore/v1/{name} is stale: run scripts/gen_proto.sh"
