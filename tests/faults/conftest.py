from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.fixtures import SLOW_EXAMPLES, make_data_root


@pytest.fixture(scope="session")
def slow_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic models and a task big enough that one evaluation takes most of a second: long enough to be
    killed in the middle of."""
    return make_data_root(tmp_path_factory.mktemp("slow-data"), examples=SLOW_EXAMPLES)
