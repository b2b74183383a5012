"""The archive: every job, candidate, strategy checkpoint and event, in SQL (the source of truth).

SQLAlchemy 2.x; SQLite in WAL mode by default, any SQLAlchemy URL (PostgreSQL on a cluster). The schema is
created and upgraded by Alembic migrations (`orchestrator/migrations`). The driver's invariants live here:
asking candidates and saving the strategy state is one transaction, and so is finishing a candidate and
saving the state after `tell`, so a restarted driver finds the archive and the strategy in agreement and
never counts a candidate twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from orchestrator.errors import NotFound, Unavailable, UserError
from orchestrator.records import ENDED, UNFINISHED, CandidateStatus, JobStatus, Kind

DEFAULT_URL = "sqlite:///" + str(Path("~/.mergesearch/archive.db").expanduser())
MAX_ID = 2**31 - 1
"""Largest row id (and integer column): the schema's INTEGERs are 32-bit on PostgreSQL."""
T = TypeVar("T")


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED, index=True)
    owner: Mapped[str] = mapped_column(String(100), default="")
    strategy: Mapped[str] = mapped_column(String(50), default="")
    budget: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=now)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    """When the job last joined the service's queue: its place in line (a resumed job goes to the back)."""
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Candidate(Base):
    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20), default=Kind.SEARCH)
    """A `records.Kind`."""
    name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    recipe_hash: Mapped[str] = mapped_column(String(64))
    genome: Mapped[list[Any]] = mapped_column(JSON, default=list)
    parents: Mapped[list[Any]] = mapped_column(JSON, default=list)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    subset: Mapped[int] = mapped_column(Integer, default=0)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), default=CandidateStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(100), nullable=True)
    dev: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    test: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    per_example: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fitness: Mapped[float | None] = mapped_column(Float, nullable=True)
    sparsity: Mapped[float | None] = mapped_column(Float, nullable=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (
        Index("ix_candidates_job_status", "job_id", "status"),
        Index("ix_candidates_job_fitness", "job_id", "kind", "fitness"),
        Index("ix_candidates_job_number", "job_id", "kind", "number"),
        Index("ix_candidates_job_kind_status", "job_id", "kind", "status"),
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "kind": self.kind,
            "name": self.name,
            "number": self.number,
            "status": self.status,
            "fitness": self.fitness,
            "dev": self.dev,
            "test": self.test,
            "sparsity": self.sparsity,
            "recipe": self.recipe,
            "recipe_hash": self.recipe_hash,
            "genome": self.genome,
            "parents": self.parents,
            "generation": self.generation,
            "subset": self.subset,
            "info": self.info,
            "attempts": self.attempts,
            "worker": self.worker,
            "timings": self.timings,
            "error": self.error,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=now)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=now)
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)


SORTABLE = {
    "fitness": Candidate.fitness,
    "id": Candidate.id,
    "generation": Candidate.generation,
    "sparsity": Candidate.sparsity,
}
"""Columns candidates can be listed by."""


class ArchiveError(Unavailable):
    """The database could not be reached after retries (a missing row is `NotFound`)."""


KEEP_CHECKPOINTS = 3


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) != ":memory:":
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


class Archive:
    """Queries and the transactions the driver relies on. Retries transient connection errors with backoff."""

    def __init__(self, url: str | None = None, retries: int = 5, backoff: float = 0.2) -> None:
        self.url = url or os.environ.get("MERGESEARCH_DB") or DEFAULT_URL
        self.retries = retries
        self.backoff = backoff
        self.engine = make_engine(self.url)
        self._retry(lambda: migrate(self.url))
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    # -- plumbing ---------------------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries):
            try:
                return fn()
            except OperationalError as exc:
                if attempt == self.retries - 1:
                    reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc)
                    raise ArchiveError(f"database {self.engine.url!r} unreachable: {reason}") from None
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session

    def transaction(self, fn: Callable[[Session], T]) -> T:
        def run() -> T:
            with self._tx() as s:
                return fn(s)

        return self._retry(run)

    # -- jobs -------------------------------------------------------------------------------------------
    def create_job(
        self, spec: dict[str, Any], name: str, owner: str = "", status: JobStatus = JobStatus.QUEUED
    ) -> int:
        def fn(s: Session) -> int:
            job = Job(
                name=name,
                spec=spec,
                owner=owner,
                status=status,
                strategy=spec.get("search", {}).get("strategy", ""),
                budget=spec.get("search", {}).get("budget", 0),
                queued_at=now() if status == JobStatus.QUEUED else None,
            )
            s.add(job)
            s.flush()
            s.add(Event(job_id=job.id, message=f"job created ({job.strategy}, budget {job.budget})"))
            return job.id

        return self.transaction(fn)

    def job(self, job_id: int) -> Job:
        job = self.transaction(lambda s: s.get(Job, job_id))
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def jobs(self, status: str | None = None, owner: str | None = None, by_queue: bool = False) -> list[Job]:
        """Jobs by id, or with `by_queue` in queue order (when each last joined the queue)."""

        def fn(s: Session) -> list[Job]:
            q = select(Job).order_by(Job.queued_at, Job.id) if by_queue else select(Job).order_by(Job.id)
            if status:
                q = q.where(Job.status == status)
            if owner is not None:
                q = q.where(Job.owner == owner)
            return list(s.scalars(q))

        return self.transaction(fn)

    def enqueue(self, job_id: int, owner: str) -> None:
        """Hand a job to `owner`'s queue (the service's): status queued; it continues from its archive."""

        def fn(s: Session) -> None:
            s.execute(
                update(Job).where(Job.id == job_id).values(status=JobStatus.QUEUED, owner=owner, error=None, queued_at=now())
            )
            s.add(Event(job_id=job_id, message=f"job queued ({owner})"))

        self.transaction(fn)

    def set_status(self, job_id: int, status: JobStatus, error: str | None = None) -> None:
        def fn(s: Session) -> None:
            values: dict[str, Any] = {"status": status}
            if status == JobStatus.RUNNING:
                values["started_at"] = now()
            if status in ENDED:
                values["finished_at"] = now()
            if error is not None:
                values["error"] = error
            s.execute(update(Job).where(Job.id == job_id).values(**values))
            s.add(Event(job_id=job_id, level="error" if error else "info", message=error or f"job {status}"))

        self.transaction(fn)

    def log(self, job_id: int, message: str, level: str = "info") -> None:
        self.transaction(lambda s: s.add(Event(job_id=job_id, level=level, message=message)))

    def events(self, job_id: int, limit: int = 100) -> list[Event]:
        q = select(Event).where(Event.job_id == job_id).order_by(Event.id.desc()).limit(limit)
        return self.transaction(lambda s: list(s.scalars(q)))

    def run_seconds(self, job_id: int) -> float:
        """Seconds the job's drivers have run: each from its start (the job set running) to the job's last
        record (a candidate asked or finished, an event) before the next start. Time the job was stopped, or
        its service down, does not count; a driver's own time ends at the last thing it recorded."""
        started = f"job {JobStatus.RUNNING}"  # the event `set_status` writes

        def fn(s: Session) -> float:
            starts = list(s.scalars(
                select(Event.at).where(Event.job_id == job_id, Event.message == started).order_by(Event.at)
            ))
            total = 0.0
            for begin, end in zip(starts, [*starts[1:], None]):
                last = [
                    s.scalar(select(func.max(column)).where(
                        owner == job_id, column >= begin, *([column < end] if end is not None else [])
                    ))
                    for column, owner in ((Candidate.created_at, Candidate.job_id),
                                          (Candidate.finished_at, Candidate.job_id), (Event.at, Event.job_id))
                ]
                total += (max(t for t in last if t is not None) - begin).total_seconds()
            return total

        return self.transaction(fn)

    # -- candidates -------------------------------------------------------------------------------------
    def add_candidates(
        self, job_id: int, rows: list[dict[str, Any]], state: dict[str, Any] | None = None, step: int = 0
    ) -> list[int]:
        """Insert pending candidates and (optionally) the strategy state that asked them, atomically."""

        def fn(s: Session) -> list[int]:
            objs = [Candidate(job_id=job_id, **row) for row in rows]
            s.add_all(objs)
            if state is not None:
                _save_checkpoint(s, job_id, step, state)
            s.flush()
            return [o.id for o in objs]

        return self.transaction(fn)

    def start(self, cand_id: int, worker: str) -> None:
        self.start_many([cand_id], worker)

    def start_many(self, cand_ids: list[int], worker: str) -> None:
        """Mark candidates running (one more attempt each), in one transaction: a dispatch round."""
        table = Candidate.__table__
        self.transaction(
            lambda s: s.execute(
                update(table)
                .where(table.c.id.in_(cand_ids))
                .values(status=CandidateStatus.RUNNING, worker=worker, attempts=table.c.attempts + 1)
            )
        )

    def requeue(self, cand_id: int, reason: str) -> None:
        """A worker died under this candidate: back to pending (attempts are kept)."""

        def fn(s: Session) -> None:
            s.execute(update(Candidate).where(Candidate.id == cand_id).values(status=CandidateStatus.PENDING, error=reason))

        self.transaction(fn)

    def finish(
        self,
        cand_id: int,
        values: dict[str, Any],
        state: dict[str, Any] | None = None,
        step: int = 0,
        job_id: int | None = None,
    ) -> bool:
        """Record a finished (done or failed) candidate and the strategy state after `tell`, atomically.

        Returns False, writing nothing, if the candidate was already finished: a result is never counted twice.
        """
        return bool(self.finish_many([(cand_id, values)], state, step, job_id))

    def finish_many(
        self,
        finished: list[tuple[int, dict[str, Any]]],
        state: dict[str, Any] | None = None,
        step: int = 0,
        job_id: int | None = None,
    ) -> list[int]:
        """Record finished candidates and the strategy state after telling them all, in one transaction.

        Returns the ids recorded; a candidate already finished is skipped (never counted twice), and the state
        is saved only if some candidate was recorded. One transaction per batch of completions is what lets
        the driver keep up with hundreds of workers.
        """
        table = Candidate.__table__

        def fn(s: Session) -> list[int]:
            recorded = []
            for cand_id, values in finished:
                res = s.execute(
                    update(table)
                    .where(table.c.id == cand_id, table.c.status.in_(UNFINISHED))
                    .values(finished_at=now(), **values)
                )
                if res.rowcount == 1:
                    recorded.append(cand_id)
            if recorded and state is not None and job_id is not None:
                _save_checkpoint(s, job_id, step, state)
            return recorded

        return self.transaction(fn)

    def set_test(self, cand_id: int, test: dict[str, float], dev_full: dict[str, float] | None = None) -> None:
        def fn(s: Session) -> None:
            cand = s.get(Candidate, cand_id)
            if cand is None:
                raise NotFound(f"candidate {cand_id} not found")
            cand.test = test
            if dev_full is not None:
                cand.info = {**(cand.info or {}), "dev_full": dev_full}

        self.transaction(fn)

    def candidate(self, cand_id: int, job_id: int | None = None) -> Candidate:
        """The candidate; NotFound if there is none (or it is not `job_id`'s, when given)."""
        cand = self.transaction(lambda s: s.get(Candidate, cand_id))
        if cand is None or (job_id is not None and cand.job_id != job_id):
            raise NotFound(f"job {job_id} has no candidate {cand_id}" if job_id else f"candidate {cand_id} not found")
        return cand

    def candidates(
        self,
        job_id: int,
        kind: str | None = None,
        status: str | None = None,
        order: str = "fitness",
        descending: bool = True,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Candidate]:
        """Candidates of a job, sorted and paged in SQL (no value sorts last).

        The sort and the offset run over (key, id) alone and only the rows returned are loaded: sorting whole
        rows, recipes included, to skip 50,000 of them took seconds at 100k candidates.
        """
        column = SORTABLE.get(order)
        if column is None:
            raise UserError(f"cannot sort by '{order}' ({', '.join(SORTABLE)})")
        q = select(Candidate.id).where(Candidate.job_id == job_id)
        if kind:
            q = q.where(Candidate.kind == kind)
        if status:
            q = q.where(Candidate.status == status)
        key = column.desc() if descending else column.asc()
        # NULLS LAST rather than an `IS NULL` sort key: SQLite then walks the (job, kind, fitness) index
        # instead of sorting every row (top 50 of 100k candidates: ~5 ms instead of ~200 ms).
        q = q.order_by(key.nulls_last(), Candidate.id).offset(offset)
        if limit is not None:
            q = q.limit(limit)

        def fn(s: Session) -> list[Candidate]:
            ids = list(s.scalars(q))
            rows = {c.id: c for c in s.scalars(select(Candidate).where(Candidate.id.in_(ids)))}
            return [rows[i] for i in ids]

        return self.transaction(fn)

    def best(self, job_id: int) -> Candidate | None:
        """The job's model: the best of its finalists (all scored on the whole dev split) once the driver has
        chosen, else the search candidate of highest fitness so far."""
        rows = self.candidates(job_id, kind=Kind.FINAL, status=CandidateStatus.DONE, limit=1)
        rows = rows or self.candidates(job_id, kind=Kind.SEARCH, status=CandidateStatus.DONE, limit=1)
        return rows[0] if rows else None

    def first_recipe(self, job_id: int) -> dict[str, Any] | None:
        """The recipe of the job's first search candidate (None before it has one)."""
        rows = self.candidates(job_id, kind=Kind.SEARCH, order="id", descending=False, limit=1)
        return rows[0].recipe if rows else None

    def unfinished(self, job_id: int) -> list[Candidate]:
        q = (
            select(Candidate)
            .where(Candidate.job_id == job_id, Candidate.status.in_(UNFINISHED))
            .order_by(Candidate.id)
        )
        return self.transaction(lambda s: list(s.scalars(q)))

    def counts(self, job_id: int, kind: Kind = Kind.SEARCH) -> dict[str, int]:
        q = (
            select(Candidate.status, func.count())
            .where(Candidate.job_id == job_id, Candidate.kind == kind)
            .group_by(Candidate.status)
        )
        return self.transaction(lambda s: {status: n for status, n in s.execute(q)})

    def count(self, job_id: int, kind: str | None = None, status: str | None = None) -> int:
        """How many candidates `candidates` would list without paging (for page totals)."""
        q = select(func.count()).select_from(Candidate).where(Candidate.job_id == job_id)
        if kind:
            q = q.where(Candidate.kind == kind)
        if status:
            q = q.where(Candidate.status == status)
        return self.transaction(lambda s: s.execute(q).scalar_one())

    def tallies(self, job_ids: list[int]) -> dict[int, dict[str, Any]]:
        """Search candidates per status and each job's best fitness, in one grouped query.

        What a job list shows; one query per job would make listing many jobs slow. `best` is `Archive.best`'s
        fitness: the best finalist's (scored on the whole dev split) once there is one, else the best search
        candidate's so far (scored on a chunk), which is `best_search` throughout.
        """
        q = (
            select(Candidate.job_id, Candidate.kind, Candidate.status, func.count(), func.max(Candidate.fitness))
            .where(Candidate.job_id.in_(job_ids), Candidate.kind.in_((Kind.SEARCH, Kind.FINAL)))
            .group_by(Candidate.job_id, Candidate.kind, Candidate.status)
        )

        def fn(s: Session) -> dict[int, dict[str, Any]]:
            out: dict[int, dict[str, Any]] = {j: {"counts": {}} for j in job_ids}
            best: dict[tuple[int, str], float | None] = {}
            for job_id, kind, status, n, top in s.execute(q):
                if kind == Kind.SEARCH:
                    out[job_id]["counts"][status] = n
                if status == CandidateStatus.DONE:
                    best[job_id, kind] = top
            for j in job_ids:
                out[j]["best_search"] = best.get((j, Kind.SEARCH))
                out[j]["best"] = best.get((j, Kind.FINAL), out[j]["best_search"])
            return out

        return self.transaction(fn)

    # -- checkpoints ------------------------------------------------------------------------------------
    def last_checkpoint(self, job_id: int) -> Checkpoint | None:
        q = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.id.desc()).limit(1)
        return self.transaction(lambda s: s.scalars(q).first())


def _save_checkpoint(s: Session, job_id: int, step: int, state: dict[str, Any]) -> None:
    """Add a checkpoint and drop all but the newest few, inside the caller's transaction.

    Two Core statements (the driver saves one per finished candidate, so this is on its hot path).
    """
    table = Checkpoint.__table__
    s.execute(insert(table).values(job_id=job_id, step=step, state=state, created_at=now()))
    oldest_kept = (
        select(table.c.id)
        .where(table.c.job_id == job_id)
        .order_by(table.c.id.desc())
        .offset(KEEP_CHECKPOINTS - 1)
        .limit(1)
        .scalar_subquery()
    )
    s.execute(delete(table).where(table.c.job_id == job_id, table.c.id < oldest_kept))
