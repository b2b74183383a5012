"""Starting a job: the one start path of `run`, `compare` and the service's scheduler.

A start opens the job's models (which checks them against each other and counts the layers), derives the
run's settings, gets a worker pool from a cluster, and drives the job with a `Driver`. The derived settings
(`RunSettings`) live beside the spec and travel with each piece of work to the workers; they are never written
into the spec, so the archive keeps a job as it was submitted and `compare` runs every strategy with its own
settings from the same spec and the same pool. Light to import (Ray and torch load where they run), so
`pull` opens its sources here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.archive import Archive
from orchestrator.jobspec import JobSpec, dev_sizes, strategy_params

if TYPE_CHECKING:
    from orchestrator.driver import Progress
    from orchestrator.pool import Pool
    from workers.sources import Sources

Resources = dict[str, float]


@dataclass(frozen=True)
class RunSettings:
    """What a run derives from its spec and strategy when it starts."""

    num_layers: int
    """Decoder layers of the base model: the depth of the recipes the search space decodes."""
    dev_subset: int
    """Examples per dev chunk: `evaluation.dev_subset`, unless the strategy cycles the data in fractions
    (RMM's `data_scale`): then the smallest dev split over round(1/data_scale), so that its chunks are the
    worker's chunks."""


def open_sources(spec: JobSpec) -> Sources:
    """The job's models, opened as its workers open them (vocabulary and remote code as the spec says)."""
    from workers.sources import Sources

    return Sources(
        spec.models.base,
        dict(spec.models.experts),
        trust_remote_code=spec.trust_remote_code,
        tokenizer_source=spec.models.tokenizer_source,
    )


def run_settings(spec: JobSpec, num_layers: int | None = None) -> RunSettings:
    """The run settings of `spec`, opening its models to count their layers unless `num_layers` is given."""
    layers = open_sources(spec).num_layers if num_layers is None else num_layers
    scale = getattr(strategy_params(spec), "data_scale", None)
    if scale is None:
        return RunSettings(layers, spec.evaluation.dev_subset)
    return RunSettings(layers, max(1, min(dev_sizes(spec)) // round(1 / scale)))


def run_job(
    archive: Archive,
    spec: JobSpec,
    job_id: int,
    pool: Pool,
    settings: RunSettings | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    interrupted: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Drive job `job_id` on `pool` to its end (or a stop); returns its report. `settings` default to
    `run_settings(spec)`; the hooks are the `Driver`'s."""
    from orchestrator.driver import Driver

    driver = Driver(
        archive, spec, job_id, pool, settings or run_settings(spec),
        on_progress=on_progress, should_stop=should_stop, interrupted=interrupted,
    )
    return driver.run()


class Cluster(Protocol):
    """Where workers come from: a Ray cluster in production, an in-process stand-in in tests."""

    def capacity(self) -> Resources: ...
    def pool(self, spec: JobSpec, workers: int, should_stop: Callable[[], bool]) -> Pool:
        """Start a job's pool; gives up with `PoolStopped` once `should_stop()` (checked while starting)."""

    def close(self) -> None: ...


class RayCluster:
    """A Ray cluster joined at `address`, or a local Ray it starts (`num_cpus`, default all) and stops."""

    def __init__(
        self, address: str | None = None, start_timeout: float | None = None, num_cpus: int | None = None
    ) -> None:
        from orchestrator.pool import RayRuntime

        self.start_timeout = start_timeout
        self.runtime = RayRuntime(address=address, num_cpus=None if address else num_cpus).__enter__()

    def capacity(self) -> Resources:
        import ray

        return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}

    def pool(self, spec: JobSpec, workers: int, should_stop: Callable[[], bool] = lambda: False) -> Pool:
        from orchestrator.pool import RayPool, worker_setup

        return RayPool(worker_setup(spec), workers, spec.workers.num_cpus, spec.workers.num_gpus,
                       should_stop=should_stop, start_timeout=self.start_timeout)

    def close(self) -> None:
        self.runtime.__exit__(None, None, None)


@contextmanager
def ray_pool(spec: JobSpec, address: str | None = None) -> Iterator[Pool]:
    """The job's `workers.count` workers on the Ray cluster at `address`, or on a local Ray with the CPUs they
    ask for; the workers, and a Ray started here, stop with the block (`run`, `compare`, the benchmarks)."""
    cpus = max(int(spec.workers.count * spec.workers.num_cpus), 1)
    with closing(RayCluster(address, num_cpus=cpus)) as cluster, closing(
        cluster.pool(spec, spec.workers.count)
    ) as pool:
        yield pool
