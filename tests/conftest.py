"""Shared fixtures. `zoo_dir`: the quick model zoo, built once and cached across test sessions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.postgres"]  # `postgres`, `postgres_url`, `archive_url`: a real PostgreSQL per session


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The quick-profile zoo (base, experts, tasks, job.yaml, zoo.json); about a minute to build the first time.

    Cached in ~/.cache/mergesearch/test-zoo-<version> (or $MERGESEARCH_TEST_ZOO); a second session reuses it.
    """
    from workers.zoo import ZOO_VERSION, build_zoo

    default = f"~/.cache/mergesearch/test-zoo-{ZOO_VERSION}"
    root = Path(os.environ.get("MERGESEARCH_TEST_ZOO", default)).expanduser()
    build_zoo(root, profile="quick")
    return root
