"""The archive's transactions: exactly-once finishing, atomic checkpoints, SQL-side sorting and paging."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.archive import KEEP_CHECKPOINTS, Archive, ArchiveError
from orchestrator.errors import NotFound, UserError, outcome


@pytest.fixture()
def archive(archive_url: str) -> Archive:
    """Every test here runs on SQLite and on a real PostgreSQL (`archive_url`, tests/postgres.py)."""
    return Archive(archive_url)


def _rows(n: int) -> list[dict]:
    return [{"number": i, "recipe": {"i": i}, "recipe_hash": str(i)} for i in range(n)]


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    with archive.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_finish_counts_a_candidate_once(archive: Archive) -> None:
    job = archive.create_job({"search": {"strategy": "random", "budget": 2}}, "j")
    (cid,) = archive.add_candidates(job, _rows(1))
    archive.start(cid, "w1")
    assert archive.finish(cid, {"status": "done", "fitness": 0.5}, {"told": 1}, 1, job)
    assert not archive.finish(cid, {"status": "done", "fitness": 0.9}, {"told": 2}, 2, job)
    cand = archive.candidate(cid)
    assert cand.fitness == 0.5 and cand.attempts == 1
    assert archive.last_checkpoint(job).state == {"told": 1}
    assert archive.counts(job) == {"done": 1}


def test_checkpoints_are_pruned_to_the_newest(archive: Archive) -> None:
    job = archive.create_job({}, "j")
    for step in range(KEEP_CHECKPOINTS + 4):
        archive.add_candidates(job, _rows(1), {"step": step}, step)
    assert archive.last_checkpoint(job).state == {"step": KEEP_CHECKPOINTS + 3}
    with archive.engine.connect() as conn:
        assert conn.exec_driver_sql("select count(*) from checkpoints").scalar() == KEEP_CHECKPOINTS


def test_candidates_sorted_and_paged_in_sql(archive: Archive) -> None:
    job = archive.create_job({}, "j")
    ids = archive.add_candidates(job, _rows(10))
    fitness = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0]
    for cid, f in zip(ids, fitness):
        archive.finish(cid, {"status": "done", "fitness": f})
    top = archive.candidates(job, limit=3)
    assert [c.fitness for c in top] == sorted(fitness, reverse=True)[:3]
    page2 = archive.candidates(job, limit=3, offset=3)
    assert [c.fitness for c in page2] == sorted(fitness, reverse=True)[3:6]
    assert archive.best(job).fitness == max(fitness)
    with pytest.raises(UserError, match="cannot sort by 'name'"):
        archive.candidates(job, order="name")


def test_tallies_report_the_best_that_best_returns(archive: Archive) -> None:
    """A job list's best fitness is the job's model's: the promoted whole-dev score once finalists are
    scored, even when a search candidate's chunk score is higher; before that, the best chunk score."""
    job, other = archive.create_job({}, "j"), archive.create_job({}, "k")
    searched = archive.add_candidates(job, _rows(3))
    for cid, f in zip(searched, [0.9, 0.6, None]):
        archive.finish(cid, {"status": "done" if f is not None else "failed", "fitness": f})
    (lone,) = archive.add_candidates(other, _rows(1))
    archive.finish(lone, {"status": "done", "fitness": 0.4})
    assert archive.tallies([job, other])[job]["best"] == archive.best(job).fitness == 0.9
    finals = archive.add_candidates(job, [{**row, "kind": "final"} for row in _rows(3)])
    for cid, f in zip(finals, [0.7, 0.75, 0.8]):
        archive.finish(cid, {"status": "done", "fitness": f})
    tallies = archive.tallies([job, other])
    assert tallies[job]["best"] == archive.best(job).fitness == 0.8 and tallies[job]["best_search"] == 0.9
    assert tallies[job]["counts"] == {"done": 2, "failed": 1}  # search candidates only
    assert tallies[other] == {"counts": {"done": 1}, "best": 0.4, "best_search": 0.4}


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    with pytest.raises(ArchiveError, match="unreachable") as down:
        Archive(url, retries=2, backoff=0.01)
    assert outcome(down.value) == (503, 3)


def test_missing_rows_are_not_found_not_unavailable(archive: Archive) -> None:
    """One error kind each: a missing row (404, exit 2) is not a database that is down (503, exit 3)."""
    with pytest.raises(NotFound, match="job 42 not found") as missing:
        archive.job(42)
    assert not isinstance(missing.value, ArchiveError) and outcome(missing.value) == (404, 2)
    with pytest.raises(NotFound, match="candidate 7 not found"):
        archive.candidate(7)
