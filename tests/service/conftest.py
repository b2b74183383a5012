from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from orchestrator.service.app import create_app
from orchestrator.service.settings import ServiceSettings
from tests.service.fixtures import TOKEN, FakeCluster, make_data_root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data"))


@pytest.fixture()
def cluster() -> FakeCluster:
    return FakeCluster(cpus=4)


@pytest.fixture()
def settings(tmp_path: Path, data_root: Path, archive_url: str) -> ServiceSettings:
    """Each service test runs on SQLite and on PostgreSQL."""
    return ServiceSettings(
        db=archive_url,
        data_roots=[data_root],
        token=TOKEN,
        max_running=2,
        max_body_bytes=64 * 1024,
        state_dir=tmp_path / "state",
        rebalance_seconds=0.2,
    )


@pytest.fixture()
def client(settings: ServiceSettings, cluster: FakeCluster) -> Iterator[TestClient]:
    app = create_app(settings, cluster=cluster)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c
