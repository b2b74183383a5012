from tests.faults.conftest import slow_root  # noqa: F401  (the same slow-to-evaluate data root)
