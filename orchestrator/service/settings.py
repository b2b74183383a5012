"""What `mergesearch serve` is configured with: one object, built by the CLI or by tests."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_STATE_DIR = Path("~/.mergesearch/service").expanduser()
DEFAULT_DATA_ROOT = Path("~/.mergesearch").expanduser()


class ServiceSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    db: str | None = None
    """SQLAlchemy URL of the archive (None: `MERGESEARCH_DB` or the default SQLite file)."""
    db_retries: int = Field(8, ge=1)
    """Tries of a database call, with backoff doubling from 0.2 s: 8 ride out about 25 s of outage (a
    PostgreSQL restart or failover) before a job fails with the database's error."""
    ray_address: str | None = None
    """Ray cluster to join (None: start a local Ray in this process)."""
    data_roots: list[Path] = Field(default_factory=list)
    """The only folders job files may name models and tasks under; relative paths resolve against the first."""
    max_running: int = Field(2, ge=1)
    """Jobs whose drivers run at once; later jobs wait in the queue, in order."""
    token: str = Field(min_length=16, repr=False)  # auth.MIN_LENGTH
    allow_remote_code: bool = False
    """Whether a job may set `trust_remote_code: true`."""
    allow_task_code: bool = False
    """Whether an lm-eval task file may name Python (`!function`), which the service imports to check it."""
    unschedulable_seconds: float = Field(300.0, gt=0)
    """How long a job whose workers fit nowhere on the cluster waits (for the cluster to grow) before it
    fails with the reason; jobs behind it are not held up meanwhile."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    rebalance_seconds: float = Field(5.0, gt=0)
    """How often worker shares are recomputed against the cluster's capacity (nodes come and go)."""
    state_dir: Path = DEFAULT_STATE_DIR
    """Where pulled models are cached for download."""
