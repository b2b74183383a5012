"""Worker pools: where the driver sends candidates. Ray actors in production, in-process for benchmarks.

A pool runs one piece of work per worker at a time and reports completions; a worker that dies under a
piece of work is reported as `lost`, so the driver can retry the candidate elsewhere. Ray restarts dead
actors (`max_restarts=-1`), which is how the pool replaces a worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError
from ray.exceptions import OutOfMemoryError as RayOutOfMemoryError

if TYPE_CHECKING:
    from workers.worker import WorkerSetup


@dataclass(frozen=True)
class Work:
    cand_id: int
    recipe: dict[str, Any]
    subset: int = 0
    splits: tuple[str, ...] = ("dev",)
    dev_subset: int | None = None
    """Examples per dev chunk (the run's `RunSettings.dev_subset`); None: the worker's own."""


@dataclass
class Completion:
    work: Work
    output: dict[str, Any] | None = None
    lost: str | None = None
    """Why the worker was lost under this work (its process or node died); None if it finished."""


class Pool(Protocol):
    size: int

    def submit(self, work: Work) -> None: ...
    def wait(self, timeout: float | None = None) -> list[Completion]: ...
    def inflight(self) -> int: ...
    def resize(self, count: int) -> None:
        """Ask for `count` workers from any thread; `size` follows in the driver's next `wait`, never between a
        driver's reading `size` and its submits."""

    def close(self) -> None: ...


@dataclass
class _Slot:
    actor: Any
    work: Work | None = None
    ref: Any = None
    """The running evaluation; None while `work` waits for the actor to come back."""
    ready: Any = None
    """A ping that resolves once the actor is up again (after a restart, or when new); None when it is up."""


class PoolStopped(RuntimeError):
    """The pool was asked to stop (its job cancelled, the service stopping) while its workers were starting."""


LOST = (RayActorError, WorkerCrashedError, RayOutOfMemoryError)
"""A worker process or node died under the work (Ray's memory monitor killing a worker included)."""


class RayPool:
    """One long-lived Ray actor per worker slot; `submit` goes to an idle actor.

    An actor that dies is restarted by Ray (on another node if its node died). Until it answers a ping again it
    gets no work if another slot is idle; work given to it waits and starts when it is back, because a call
    sent to a restarting actor would fail at once and burn one of the candidate's attempts for nothing.
    """

    def __init__(
        self,
        setup: WorkerSetup,
        count: int,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        resources: dict[str, float] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        start_timeout: float | None = None,
    ) -> None:
        """Start `count` workers and wait until each answers, or until `should_stop()` (PoolStopped) or
        `start_timeout` seconds (RuntimeError: Ray could not place them, e.g. no node has the resources one
        needs), checked every second; the workers started so far are then killed."""
        from workers.worker import ModelWorker  # torch and transformers load only where workers run

        self.setup = setup
        self.remote = ray.remote(ModelWorker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0, resources=resources
        )
        self.size = self.target = count
        self.slots = [_Slot(actor=self._new_actor()) for _ in range(count)]
        # Fail fast on a bad setup (missing files, mismatched models): surface the actor's own error line.
        waiting = [s.actor.ping.remote() for s in self.slots]
        started = time.monotonic()
        try:
            with worker_start_errors():
                while waiting:
                    ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=1.0)
                    ray.get(ready)
                    if waiting and should_stop():
                        raise PoolStopped("stopped while its workers were starting")
                    if waiting and start_timeout is not None and time.monotonic() - started > start_timeout:
                        need = ", ".join(f"{v:g} {k}" for k, v in {"CPU": num_cpus, "GPU": num_gpus}.items() if v)
                        raise RuntimeError(
                            f"{len(waiting)} of {count} workers (each {need}) could not be placed on the cluster "
                            f"in {start_timeout:g} s"
                        )
        except BaseException:
            self.close()
            raise

    def _new_actor(self) -> Any:
        return self.remote.remote(self.setup, defer_start_error=True)

    def submit(self, work: Work) -> None:
        idle = sorted((s for s in self.slots if s.work is None), key=lambda s: s.ready is not None)
        if not idle:
            raise RuntimeError("no idle worker: the driver submitted more work than the pool holds")
        slot = idle[0]
        slot.work = work
        if slot.ready is None:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        work = slot.work
        assert work is not None
        slot.ref = slot.actor.evaluate.remote(work.recipe, work.subset, work.splits, work.dev_subset)

    @staticmethod
    def _await_up(slot: _Slot) -> None:
        # Retried by Ray until the actor is alive again (a plain call fails while it restarts).
        slot.ready = slot.actor.ping.options(max_task_retries=-1).remote()

    def resize(self, count: int) -> None:
        """Ask for `count` workers; safe from another thread, applied by the driver's thread in `wait`.

        New actors start at once (Ray places them when resources free up); surplus actors are killed as they
        become idle, so no running evaluation is cut short by a rebalance.
        """
        self.target = count

    def _apply_target(self) -> None:
        target = self.target  # read once: `resize` may change it meanwhile from the scheduler's thread
        while len(self.slots) < target:
            slot = _Slot(actor=self._new_actor())
            self._await_up(slot)
            self.slots.append(slot)
        surplus = len(self.slots) - target
        idle = sorted((s for s in self.slots if s.work is None), key=lambda s: s.ready is None)
        for slot in idle[: max(surplus, 0)]:  # restarting ones first
            ray.kill(slot.actor)
            self.slots.remove(slot)
        self.size = target

    def inflight(self) -> int:
        return sum(s.work is not None for s in self.slots)

    def wait(self, timeout: float | None = None) -> list[Completion]:
        self._apply_target()
        watched = {s.ref: s for s in self.slots if s.ref is not None}
        watched.update({s.ready: s for s in self.slots if s.ready is not None})
        if not watched:
            return []
        refs = list(watched)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # collect everything else that is already done too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done: list[Completion] = []
        for ref in ready:
            slot = watched[ref]
            if ref is slot.ready:
                self._came_up(slot)
                continue
            work = slot.work
            assert work is not None
            try:
                done.append(Completion(work, output=ray.get(ref)))
            except LOST as exc:
                done.append(Completion(work, lost=type(exc).__name__))
                self._await_up(slot)
            except GetTimeoutError:
                continue
            slot.work, slot.ref = None, None
        self._apply_target()
        return done

    def _came_up(self, slot: _Slot) -> None:
        try:
            with worker_start_errors(lost_too=False):
                ray.get(slot.ready)
        except LOST:
            self._await_up(slot)
            return
        slot.ready = None
        if slot.work is not None and slot.ref is None:
            self._start(slot)

    def close(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor)


@contextmanager
def worker_start_errors(lost_too: bool = True) -> Iterator[None]:
    """Turn a worker's failure to start into its one-line WorkerStartError (no Ray traceback); with `lost_too`
    also a worker process that died while starting (e.g. killed by Ray's memory monitor)."""
    from workers.worker import WorkerStartError

    try:
        yield
    except RayTaskError as exc:
        if isinstance(exc.cause, WorkerStartError):
            raise WorkerStartError(str(exc.cause)) from None
        raise
    except LOST as exc:
        if not lost_too:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkerStartError(f"a worker died while starting: {first}") from None


class LocalPool:
    """Runs work synchronously in this process with `fn(work) -> output`: tests and overhead benchmarks."""

    def __init__(self, fn: Callable[[Work], dict[str, Any]], size: int) -> None:
        self.fn = fn
        self.size = self.target = size
        self.queue: list[Work] = []

    @classmethod
    def of_worker(cls, worker: Any, size: int = 1) -> LocalPool:
        """A pool whose work a `ModelWorker` in this process evaluates, as a Ray actor would."""
        return cls(lambda w: worker.evaluate(w.recipe, w.subset, w.splits, w.dev_subset), size)

    def submit(self, work: Work) -> None:
        if len(self.queue) >= self.size:
            raise RuntimeError("no idle worker: the driver submitted more work than the pool holds")
        self.queue.append(work)

    def inflight(self) -> int:
        return len(self.queue)

    def resize(self, count: int) -> None:
        """Like `RayPool.resize`: applied in `wait`, so `size` never changes under the driver's feet."""
        self.target = count

    def wait(self, timeout: float | None = None) -> list[Completion]:
        done, self.queue = [Completion(w, output=self.fn(w)) for w in self.queue], []
        self.size = self.target
        return done

    def close(self) -> None:
        self.queue.clear()


def worker_setup(spec: Any) -> WorkerSetup:
    """The plain-data setup a worker needs, from a validated JobSpec."""
    from workers.worker import TaskSetup, WorkerSetup

    ev = spec.evaluation
    return WorkerSetup(
        base=str(spec.models.base),
        experts={n: str(p) for n, p in spec.models.experts.items()},
        tokenizer_source=spec.models.tokenizer_source,
        trust_remote_code=spec.trust_remote_code,
        tasks=[TaskSetup(**t.model_dump(mode="json")) for t in spec.tasks],
        device=ev.device,
        batch_size=ev.batch_size,
        dev_subset=ev.dev_subset,
        subset_seed=ev.seed,
        backend=ev.backend,
        extra={"engine_args": ev.engine_args} if ev.engine_args else {},
        threads=max(1, int(spec.workers.num_cpus)) if ev.device == "cpu" else None,
        cache_bytes=None if spec.workers.cache_gb is None else int(spec.workers.cache_gb * 1024**3),
    )


@dataclass
class RayRuntime:
    """Starts a local Ray or joins a cluster, and shuts down only what it started."""

    address: str | None = None
    num_cpus: int | None = None
    started: bool = field(default=False, init=False)

    def __enter__(self) -> Self:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": False,
            }
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.num_cpus, **kwargs)
            self.started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            ray.shutdown()
