"""Shared fixtures: a real local Ray, the bundled sample, a scratch run root.

Ray is started once per test session (``ray.init`` with 2 CPUs, as on CI's machine) and
shared by every test that asks for ``ray_session``; tests that need their own cluster
(``ray start --head`` in a subprocess, token auth) start one themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_cluster import MlflowServer

from ktray.data.shards import sample_path

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

SHARED_IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette" / "imagenette2-224.zip"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=1 << 30,
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_shards() -> str:
    """The bundled sample's shard directory (inside the package; read-only)."""
    return sample_path()


@pytest.fixture()
def run_root(tmp_path: Path) -> str:
    root = tmp_path / "runs"
    root.mkdir()
    return str(root)


@pytest.fixture(scope="session")
def imagenette_zip() -> Path:
    if not SHARED_IMAGENETTE.exists():
        pytest.skip(f"full Imagenette not present at {SHARED_IMAGENETTE}")
    return SHARED_IMAGENETTE


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` (SQLite) on loopback, for the tests of one module."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()
