"""The service fixtures (an app on a temp archive with an in-process cluster), shared with tests/service."""

from tests.service.conftest import client, cluster, data_root, settings  # noqa: F401  (fixtures)
