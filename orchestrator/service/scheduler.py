"""Runs the service's jobs: a FIFO queue, at most `max_running` drivers at once, workers shared fairly.

Drivers run as threads of the service process, not as Ray actors. A driver spends its time waiting on Ray and
the database (its own cost is milliseconds per candidate), so threads cost nothing, share the service's Ray
connection and connection pool, and cancel with a flag. A driver holds nothing the archive does not, so when
the service dies its drivers die with it and the next start resumes every unfinished job; detached driver
actors would outlive the service and could race a restarted one for the same job.

Fair sharing is progressive filling over the cluster's resources: every running job gets one worker, then a
second, and so on in admission order, while the workers fit and each job is under its `workers.count`. A queued
job starts when a driver slot is free and every running job, it included, still gets at least one worker.
A queued job one of whose workers fits nowhere on the cluster does not hold up the jobs behind it: it waits
aside and fails, with the reason, after `unschedulable_after` seconds (the cluster may grow meanwhile); a
pool whose workers Ray cannot place (no single node has what one needs) fails its job after as long.
Every job is checked again when it is admitted (`check`: the service's data roots), whoever queued it, so a
job queued straight in the archive (`submit --db`) is held to the same rules as one sent to the API.
Shares are recomputed when jobs start or end and when the cluster's capacity changes (a node joins or dies);
pools grow at once and shrink as their surplus workers become idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.archive import Archive, ArchiveError
from orchestrator.driver import Progress
from orchestrator.jobqueue import (
    CANCELLABLE,
    SERVICE_OWNER,
    JobConflict,
    cancel_in_archive,
    enqueue_again,
    queue_job,
    queued_jobs,
    require_status,
)
from orchestrator.jobspec import JobError, JobSpec
from orchestrator.launch import Cluster, Resources, RunSettings, run_job, run_settings
from orchestrator.pool import Pool, PoolStopped
from orchestrator.records import JobStatus

log = logging.getLogger("mergesearch.service")


def worker_demand(spec: JobSpec) -> Resources:
    return {k: v for k, v in {"CPU": spec.workers.num_cpus, "GPU": spec.workers.num_gpus}.items() if v > 0}


def fair_shares(jobs: list[tuple[int, Resources]], capacity: Resources) -> list[int]:
    """Workers per job by progressive filling: one each in turn while they fit and a job wants more."""
    used: Resources = {}
    shares = [0] * len(jobs)
    grew = True
    while grew:
        grew = False
        for i, (wanted, demand) in enumerate(jobs):
            if shares[i] >= wanted:
                continue
            if all(used.get(k, 0.0) + v <= capacity.get(k, 0.0) + 1e-9 for k, v in demand.items()):
                for k, v in demand.items():
                    used[k] = used.get(k, 0.0) + v
                shares[i] += 1
                grew = True
    return shares


@dataclass
class RunningJob:
    job_id: int
    spec: JobSpec
    workers: int
    cancel: threading.Event = field(default_factory=threading.Event)
    pool: Pool | None = None
    progress: Progress | None = None
    thread: threading.Thread | None = None


class Scheduler:
    """The queue and the running drivers. Thread-safe.

    The queue is the archive: the service's jobs that are queued, in the order they joined, after those the archive
    says are running that no driver here runs (they were running when the service stopped). So a restarted
    service finds its queue as it was, and `submit --db` and `cancel --db` work without a server.
    """

    def __init__(
        self,
        archive: Archive,
        cluster: Cluster,
        max_running: int = 2,
        settings: Callable[[JobSpec], RunSettings] = run_settings,
        rebalance_every: float = 5.0,
        check: Callable[[dict[str, Any]], JobSpec] = JobSpec.model_validate,
        unschedulable_after: float = 300.0,
    ) -> None:
        self.archive = archive
        self.cluster = cluster
        self.max_running = max_running
        self.settings = settings
        """A job's run settings (`launch.run_settings`: opens its models), derived as its driver starts."""
        self.rebalance_every = rebalance_every
        self.check = check
        self.unschedulable_after = unschedulable_after
        self.checked: dict[int, JobSpec] = {}
        """Specs of queued jobs that passed `check` (checked once per job and service start)."""
        self.unplaced_since: dict[int, float] = {}
        """Queued jobs one of whose workers fits nowhere on the cluster, and since when."""
        self.running: dict[int, RunningJob] = {}
        self.unrecorded: dict[int, str] = {}
        """Failures the database was down to record; the loop writes them once it is back."""
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.loop: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start admitting: unfinished jobs resume from the archive, those that were running first."""
        for job in self.archive.jobs(status=JobStatus.RUNNING, owner=SERVICE_OWNER):
            self.archive.log(job.id, "service started: resuming from the archive")
        self.loop = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.loop.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt every driver without changing its job's status, so the next start resumes them."""
        self.stopping.set()
        self.wake.set()
        with self.lock:
            live = list(self.running.values())
        for rj in live:
            if rj.thread:
                rj.thread.join(timeout)
            try:
                self.archive.log(rj.job_id, "service stopped: the job resumes at its next start")
            except ArchiveError as exc:
                log.error("job %s: %s", rj.job_id, exc)
        if self.loop:
            self.loop.join(timeout)

    # -- requests ---------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> int:
        job_id = queue_job(self.archive, spec)
        self.wake.set()
        return job_id

    def cancel(self, job_id: int) -> None:
        """Cancel a queued job at once, a running one at its driver's next step."""
        with self.lock:
            live = self.running.get(job_id)
            if live is None:
                cancel_in_archive(self.archive, job_id)
            else:  # its driver may be winding down after the job ended: the archive's status decides
                require_status(self.archive, job_id, CANCELLABLE, "cancelled")
                live.cancel.set()
                self.archive.log(job_id, "cancel requested")
        self.wake.set()

    def resume(self, job_id: int, wait: float = 30.0) -> None:
        """Queue a cancelled or failed job again; it continues from its archive and last checkpoint.

        A driver that is still stopping (cancelled a moment ago) is waited for, up to `wait` seconds.
        """
        live = self.live(job_id)
        if live is not None and live.thread is not None:
            live.thread.join(wait)
        with self.lock:
            if job_id in self.running:
                raise JobConflict(f"job {job_id} is running; only cancelled or failed jobs can be resumed")
            enqueue_again(self.archive, job_id)
        self.wake.set()

    # -- what the API shows -----------------------------------------------------------------------------
    # `queue` and `live` read `running` without the lock (one atomic copy or lookup), so the API never waits
    # behind an admission that is retrying an unreachable database.
    def queue(self) -> list[int]:
        """Waiting job ids, in the order they will start."""
        running = set(self.running.copy())
        orphans = [j.id for j in self.archive.jobs(status=JobStatus.RUNNING, owner=SERVICE_OWNER) if j.id not in running]
        return orphans + [j for j in queued_jobs(self.archive) if j not in running]

    def live(self, job_id: int) -> RunningJob | None:
        return self.running.get(job_id)

    def state(self, job_id: int) -> tuple[int, str] | None:
        """(workers, phase) of the job's driver while one runs it here."""
        rj = self.running.get(job_id)
        return None if rj is None else (rj.workers, rj.progress.phase if rj.progress else "starting")

    # -- admission and sharing ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._record_failures()
                self._notice_cancels()
                self._admit()
                self._rebalance()
            except ArchiveError as exc:  # the database is down: keep the queue, try again later
                log.error("scheduler: %s", exc)
            self.wake.wait(self.rebalance_every)
            self.wake.clear()

    def _admit(self) -> None:
        with self.lock:
            capacity = self.cluster.capacity()
            for job_id in self.queue():
                if len(self.running) >= self.max_running or self.stopping.is_set():
                    return
                spec = self._admissible(job_id, capacity)
                if spec is None:
                    continue
                demands = self._demands() + [(spec.workers.count, worker_demand(spec))]
                shares = fair_shares(demands, capacity)
                if self.running and min(shares) < 1:
                    return  # wait, in order, until a running job ends or the cluster grows
                self.checked.pop(job_id, None)
                rj = RunningJob(job_id, spec, workers=max(shares[-1], 1))
                rj.thread = threading.Thread(target=self._drive, args=(rj,), name=f"driver-{job_id}", daemon=True)
                self.running[job_id] = rj
                rj.thread.start()

    def _admissible(self, job_id: int, capacity: Resources) -> JobSpec | None:
        """The job's spec if it passes `check` and one of its workers fits the cluster; None (and the job
        failed, with the reason, if it cannot run or has not fitted for `unschedulable_after` s) otherwise."""
        spec = self.checked.get(job_id)
        if spec is None:
            try:
                spec = self.checked[job_id] = self.check(self.archive.job(job_id).spec)
            except (JobError, ValueError) as exc:
                self.archive.set_status(job_id, JobStatus.FAILED, error=f"refused at admission: {exc}")
                return None
        demand = worker_demand(spec)
        if fair_shares([(1, demand)], capacity)[0] == 1:
            self.unplaced_since.pop(job_id, None)
            return spec
        need = ", ".join(f"{v:g} {k}" for k, v in demand.items())
        have = ", ".join(f"{capacity.get(k, 0.0):g} {k}" for k in demand)
        since = self.unplaced_since.get(job_id)
        if since is None:
            self.unplaced_since[job_id] = time.monotonic()
            self.archive.log(job_id, f"waiting: one worker needs {need}, the cluster has {have}", "warning")
        elif time.monotonic() - since > self.unschedulable_after:
            self.unplaced_since.pop(job_id)
            self.checked.pop(job_id, None)
            self.archive.set_status(
                job_id, JobStatus.FAILED,
                error=f"unschedulable: one worker needs {need}, the cluster has {have} "
                f"(waited {self.unschedulable_after:g} s)",
            )
        return None

    def _notice_cancels(self) -> None:
        """A job cancelled in the archive directly (`cancel --db`) stops like one cancelled through the API."""
        with self.lock:
            live = list(self.running.values())
        for rj in live:
            if not rj.cancel.is_set() and self.archive.job(rj.job_id).status == JobStatus.CANCELLED:
                rj.cancel.set()

    def _demands(self) -> list[tuple[int, Resources]]:
        return [(rj.spec.workers.count, worker_demand(rj.spec)) for rj in self.running.values()]

    def _rebalance(self) -> None:
        with self.lock:
            jobs = list(self.running.values())
            shares = fair_shares(self._demands(), self.cluster.capacity())
            for rj, share in zip(jobs, shares):
                share = max(share, 1)
                if share != rj.workers:
                    rj.workers = share
                    if rj.pool is not None:
                        rj.pool.resize(share)

    # -- one job ------------------------------------------------------------------------------------------
    def _drive(self, rj: RunningJob) -> None:
        try:
            settings = self.settings(rj.spec)  # a bad model fails the job before any worker starts
            workers = rj.workers
            # Seconds on Ray, a rebalance may land meanwhile; a cancel or a shutdown stops it.
            pool = self.cluster.pool(rj.spec, workers, lambda: rj.cancel.is_set() or self.stopping.is_set())
            with self.lock:
                rj.pool = pool
                if rj.workers != workers:
                    pool.resize(rj.workers)
            run_job(
                self.archive, rj.spec, rj.job_id, pool, settings,
                on_progress=lambda p: setattr(rj, "progress", p),
                should_stop=rj.cancel.is_set,
                interrupted=self.stopping.is_set,
            )
        except PoolStopped:
            if rj.cancel.is_set() and not self.stopping.is_set():
                self.archive.set_status(rj.job_id, JobStatus.CANCELLED)
        except Exception as exc:  # noqa: BLE001 — any driver failure becomes the job's recorded error
            self._fail(rj.job_id, exc)
        finally:
            if rj.pool is not None:
                rj.pool.close()
            with self.lock:
                self.running.pop(rj.job_id, None)
            self.wake.set()

    def _fail(self, job_id: int, exc: Exception) -> None:
        if self.stopping.is_set():
            return  # interrupted by shutdown: the job resumes at the next start
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        log.error("job %s failed: %s", job_id, message)
        try:
            self.archive.set_status(job_id, JobStatus.FAILED, error=message)
        except ArchiveError as again:
            log.error("job %s: could not record its failure yet (%s)", job_id, again)
            with self.lock:
                self.unrecorded[job_id] = message

    def _record_failures(self) -> None:
        with self.lock:
            pending = dict(self.unrecorded)
        for job_id, message in pending.items():
            self.archive.set_status(job_id, JobStatus.FAILED, error=message)
            with self.lock:
                self.unrecorded.pop(job_id, None)
