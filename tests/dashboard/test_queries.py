"""The dashboard's aggregates on a hand-made archive, where every expected value can be worked out by hand."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from orchestrator.archive import Archive, Candidate, now
from orchestrator.dashboard.panels import recipe_heatmap
from orchestrator.dashboard.queries import curve, lineage, page, timing


@pytest.fixture()
def archive(tmp_path: Path) -> Archive:
    return Archive(f"sqlite:///{tmp_path / 'archive.db'}")


def add(archive: Archive, job_id: int, fitness: list[float | None], **extra: Any) -> list[int]:
    """Finished search candidates numbered 0.., finishing a second apart in the order given (None: failed)."""
    start = now() - timedelta(seconds=len(fitness))
    rows = [
        {
            "kind": "search",
            "number": i,
            "recipe": {},
            "recipe_hash": str(i),
            "status": "failed" if f is None else "done",
            "fitness": f,
            "dev": None if f is None else {"a": f, "b": 1 - f},
            "finished_at": start + timedelta(seconds=i),
            **{k: v[i] for k, v in extra.items()},
        }
        for i, f in enumerate(fitness)
    ]
    return archive.add_candidates(job_id, rows)


def test_curve_windows_give_best_so_far_median_and_quartiles(archive: Archive) -> None:
    job = archive.create_job({}, "j")
    add(archive, job, [0.2, 0.5, None, 0.1, 0.9, 0.3, 0.4])
    c = curve(archive, job, points=3)
    assert c["evaluations"] == 7 and c["window"] == 3 and c["n"] == [3, 6, 7]
    assert c["best"] == [0.5, 0.9, 0.9]
    assert c["median"] == pytest.approx([0.35, 0.3, 0.4])  # the failure leaves a gap, not a zero
    assert c["q1"] == pytest.approx([0.275, 0.2, 0.4]) and c["q3"] == pytest.approx([0.425, 0.6, 0.4])
    per_task = curve(archive, job, metric="b", points=3)
    assert per_task["best"] == pytest.approx([0.8, 0.9, 0.9])


@pytest.mark.parametrize("task", ['say "hi"', "it's", "a.b", "tab\tbed", "back\\slash", "ünï"])
def test_a_task_curve_works_whatever_the_task_is_named(archive_url: str, task: str) -> None:
    """SQLite's JSON paths cannot address a key with '"' in it: such a name once gave a curve of nulls."""
    archive = Archive(archive_url)
    job = archive.create_job({}, "j")
    ids = add(archive, job, [0.2, 0.6, 0.4])
    for cid, value in zip(ids, [0.2, 0.6, 0.4]):
        archive.transaction(
            lambda s, cid=cid, value=value: s.execute(
                update(Candidate).where(Candidate.id == cid).values(dev={task: value, "other": 1.0})
            )
        )
    assert curve(archive, job, metric=task, points=3)["best"] == pytest.approx([0.2, 0.6, 0.6])


def test_curve_orders_evaluations_by_when_they_finished(archive: Archive) -> None:
    job = archive.create_job({}, "j")
    first, second = add(archive, job, [0.9, 0.1])
    later = archive.candidate(second).finished_at + timedelta(seconds=1)
    archive.transaction(
        lambda s: s.execute(update(Candidate).where(Candidate.id == first).values(finished_at=later))
    )
    assert curve(archive, job, points=10)["best"] == [0.1, 0.9]


def test_a_window_of_failures_only_has_no_statistics(archive: Archive) -> None:
    job = archive.create_job({}, "j")
    add(archive, job, [None, None, 0.5, 0.7])
    c = curve(archive, job, points=2)
    assert c["best"] == [None, 0.7] and c["median"] == [None, pytest.approx(0.6)]
    assert curve(archive, archive.create_job({}, "empty"))["n"] == []


def test_remaining_time_follows_the_recent_rate(archive: Archive) -> None:
    job = archive.create_job({"search": {"budget": 40}}, "j")
    assert timing(archive, archive.job(job), 0) == {"elapsed_s": None, "eta_s": None}
    archive.set_status(job, "running")
    add(archive, job, [0.5] * 10)  # one evaluation a second
    estimate = timing(archive, archive.job(job), 10)
    assert estimate["eta_s"] == pytest.approx(30.0)
    archive.set_status(job, "cancelled")
    assert timing(archive, archive.job(job), 10)["eta_s"] is None


def test_lineage_reaches_the_seeds_through_shared_ancestors_and_stops_at_the_limit(archive: Archive) -> None:
    job = archive.create_job({}, "j")
    #   0   1      seeds
    #    \ / \
    #     2   3
    #      \ /
    #       4
    ids = add(
        archive,
        job,
        [0.1, 0.2, 0.3, 0.4, 0.5],
        parents=[[], [], [0, 1], [1], [2, 3]],
        generation=[0, 0, 1, 1, 2],
    )
    graph = lineage(archive, archive.candidate(ids[4]))
    assert {n["id"] for n in graph["nodes"]} == set(ids) and not graph["truncated"]
    expected = {(ids[0], ids[2]), (ids[1], ids[2]), (ids[1], ids[3]), (ids[2], ids[4]), (ids[3], ids[4])}
    assert set(map(tuple, graph["edges"])) == expected
    cut = lineage(archive, archive.candidate(ids[4]), limit=3)
    assert cut["truncated"] and {n["id"] for n in cut["nodes"]} == {ids[4], ids[3], ids[2]}
    other = archive.create_job({}, "other")
    add(archive, other, [0.9], parents=[[0]])  # number 0 of another job is not its parent
    assert len(lineage(archive, archive.candidates(other)[0])["nodes"]) == 1


def test_lineage_shows_a_reference_parent_of_a_warm_started_child(archive: Archive) -> None:
    """A strategy warm-started from the references names a reference parent by minus its row id."""
    job = archive.create_job({}, "j")
    (ref,) = archive.add_candidates(
        job, [{"kind": "reference", "name": "uniform", "recipe": {}, "recipe_hash": "u", "status": "done"}]
    )
    seed, child = add(archive, job, [0.4, 0.6], parents=[[], [0, -ref]], generation=[0, 1])
    graph = lineage(archive, archive.candidate(child))
    assert {n["id"] for n in graph["nodes"]} == {ref, seed, child}
    assert set(map(tuple, graph["edges"])) == {(ref, child), (seed, child)}


def test_pages_sort_in_sql_with_missing_values_last(archive: Archive) -> None:
    job = archive.create_job({}, "j")
    ids = add(archive, job, [0.3, None, 0.9, 0.1], sparsity=[0.5, None, 0.2, 0.7])
    assert [c["id"] for c in page(archive, job)["items"]] == [ids[2], ids[0], ids[3], ids[1]]
    ascending = page(archive, job, descending=False, limit=2, offset=1)
    assert [c["id"] for c in ascending["items"]] == [ids[0], ids[2]] and ascending["total"] == 4
    assert [c["id"] for c in page(archive, job, status="failed")["items"]] == [ids[1]]
    assert [c["id"] for c in page(archive, job, order="sparsity")["items"]] == [
        ids[3],
        ids[0],
        ids[2],
        ids[1],
    ]


def test_recipe_heatmap_has_a_row_per_layer_override_and_rest_and_a_column_per_coefficient() -> None:
    recipe = {
        "models": {"base": "base", "experts": ["math", "code"]},
        "layers": [
            {
                "from": 0,
                "op": "ties",
                "params": {"weights": [0.6, 0.3], "density": 0.3},
                "mlp": {"op": "copy", "params": {"model": "code"}},
            },
            {
                "from": 0,
                "op": "cabs",
                "params": {"weights": [0.5, 0.5], "n": 16, "m": 64, "order": [1, 0, 1]},
            },
        ],
        "rest": {"op": "linear", "params": {"weights": [0.5, 0.5]}},
    }
    heat = recipe_heatmap(recipe)
    assert heat["rows"] == ["L0", "L0 mlp", "L1", "rest"] and heat["sources"] == [0, 0, 0, None]
    assert heat["ops"] == ["ties", "copy", "cabs", "linear"]
    assert heat["columns"] == [
        "weights·math",
        "weights·code",
        "density",
        "model",
        "n",
        "m",
        "order[0]",
        "order[1]",
        "order[2]",
    ]
    assert heat["values"][0][:4] == [0.6, 0.3, 0.3, None]
    assert heat["values"][1][3] == "code" and heat["values"][2][6:] == [1.0, 0.0, 1.0]


def test_recipe_heatmap_lists_the_head_after_rest() -> None:
    recipe = {
        "models": {"base": "base", "experts": ["math", "code"]},
        "layers": [{"from": 0, "op": "linear", "params": {"weights": [0.5, 0.5]}}],
        "rest": {"op": "linear", "params": {"weights": [0.5, 0.5]}},
        "head": {"op": "copy", "params": {"model": "code"}},
        "norms": "average",
    }
    heat = recipe_heatmap(recipe)
    assert heat["rows"] == ["L0", "rest", "head"] and heat["ops"] == ["linear", "linear", "copy"]
    assert heat["values"][2][-1] == "code"
