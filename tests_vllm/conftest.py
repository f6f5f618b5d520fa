"""Fixtures of the vLLM connector tests (run in the vLLM environment, `make test-vllm`): the tiny
model folder and a kvstore service in a subprocess.

Real components only, as in tests/: the service is `kvstore serve` with G3 in a temporary folder,
each engine is a separate vLLM process (``processes.Engine``), a model worker is `kvstore worker`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny_model
from processes import Service


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("kvstore")
    svc = Service(folder / "g3", folder / "serve.log")
    svc.start()
    yield svc
    svc.stop()
