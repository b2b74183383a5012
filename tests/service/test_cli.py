"""The job commands, over HTTP against a live server (uvicorn in a thread) and straight on the archive."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.service.app import create_app
from orchestrator.service.auth import load_or_create_token
from orchestrator.service.settings import ServiceSettings
from tests.service.fixtures import TOKEN, FakeCluster, job_data, wait_for

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(settings: ServiceSettings, cluster: FakeCluster) -> Iterator[str]:
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(settings, cluster=cluster), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for(lambda: srv.started, timeout=20)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(20)


@pytest.fixture()
def job_file(data_root: Path) -> Path:
    path = data_root / "cli-job.yaml"
    path.write_text(yaml.safe_dump(job_data(budget=4)))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def as_json(*args: str, env: dict[str, str] | None = None):
    code, out, err = cli(*args, "--json", env=env)
    assert code == 0, err
    return json.loads(out)


def test_remote_commands(server: str, job_file: Path, tmp_path: Path) -> None:
    env = {"MERGESEARCH_TOKEN": TOKEN}
    view = as_json("submit", str(job_file), "--server", server, env=env)
    job = str(view["id"])
    done = wait_for(lambda: (v := as_json("status", job, "--server", server, env=env))["status"] == "done" and v)
    assert done["done"] == 4 and done["budget"] == 4
    listed = as_json("status", "--server", server, env=env)
    assert [v["id"] for v in listed] == [view["id"]]
    code, out, _ = cli("status", "--server", server, env=env)
    assert code == 0 and "4/4" in out
    rows = as_json("archive", job, "--server", server, "--top", "3", env=env)
    assert len(rows) == 3 and rows[0]["fitness"] == done["best_fitness"]
    assert [r["fitness"] for r in rows] == sorted((r["fitness"] for r in rows), reverse=True)
    code, _, err = cli("pull", job, "--out", str(tmp_path / "best"), "--server", server, env=env)
    assert code == 0, err
    assert (tmp_path / "best" / "config.json").is_file()
    assert json.loads((tmp_path / "best" / "recipe.json").read_text()) == rows[0]["recipe"]
    code, _, err = cli("cancel", job, "--server", server, env=env)
    assert code == 2 and "server said 409" in err and "only queued or running" in err
    code, _, err = cli("resume", job, "--server", server, env=env)
    assert code == 2 and "only cancelled or failed" in err
    code, _, err = cli("status", job, "--server", server, env={"MERGESEARCH_TOKEN": "wrong-token-000000"})
    assert code == 2 and "server said 401: wrong bearer token" in err
    code, _, err = cli("status", "--server", "http://127.0.0.1:9", env=env)
    assert code == 3 and "cannot reach" in err  # unavailable, not the user's error


def test_server_and_archive_answer_alike(
    server: str, settings: ServiceSettings, job_file: Path, tmp_path: Path
) -> None:
    """`--server` and `--db` go through the same application layer: the same views, pages and refusals."""
    from orchestrator.archive import Archive

    env, db = {"MERGESEARCH_TOKEN": TOKEN}, settings.db
    job = str(as_json("submit", str(job_file), "--server", server, env=env)["id"])
    wait_for(lambda: as_json("status", job, "--server", server, env=env)["status"] == "done")
    remote, local = as_json("status", job, "--server", server, env=env), as_json("status", job, "--db", db)
    assert remote == local
    assert as_json("archive", job, "--server", server, env=env) == as_json("archive", job, "--db", db)
    best = Archive(db).best(int(job))
    (pending,) = Archive(db).add_candidates(int(job), [{"recipe": best.recipe, "recipe_hash": best.recipe_hash}])
    for where in (["--server", server], ["--db", db]):
        code, _, err = cli("pull", job, "--candidate", str(pending), "--out", str(tmp_path / "m"), *where, env=env)
        assert code == 2 and f"candidate {pending} is pending, not done" in err, err
    assert not (tmp_path / "m").exists()


def test_submit_refusals_name_the_field(server: str, data_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    data = job_data()
    data["models"]["base"] = "/etc"
    bad.write_text(yaml.safe_dump(data))
    code, _, err = cli("submit", str(bad), "--server", server, "--root", str(data_root),
                       env={"MERGESEARCH_TOKEN": TOKEN})
    assert code == 2 and "server said 400" in err and "field 'models.base'" in err
    assert len(err.strip().splitlines()) == 1


def test_local_commands_share_the_archive(tmp_path: Path, job_file: Path, data_root: Path) -> None:
    db = f"sqlite:///{tmp_path / 'local.db'}"
    code, _, err = cli("submit", str(job_file), "--db", db, "--data-root", str(tmp_path))
    assert code == 2 and "outside the server's data roots" in err  # the same checks as a server's
    first = as_json("submit", str(job_file), "--db", db, "--data-root", str(data_root))
    second = as_json("submit", str(job_file), "--db", db, "--data-root", str(data_root))
    assert (first["status"], first["queue_position"]) == ("queued", 1)
    assert second["queue_position"] == 2
    cancelled = as_json("cancel", str(first["id"]), "--db", db)
    assert cancelled["status"] == "cancelled"
    assert as_json("status", str(second["id"]), "--db", db)["queue_position"] == 1
    resumed = as_json("resume", str(first["id"]), "--db", db)
    assert (resumed["status"], resumed["queue_position"]) == ("queued", 2)
    assert as_json("archive", str(first["id"]), "--db", db) == []
    code, _, err = cli("status", "99", "--db", db)
    assert code == 2 and "job 99 not found" in err
    code, _, err = cli("status", "--db", db, "--server", "http://127.0.0.1:9")
    assert code == 2 and "not both" in err


def test_serve_refuses_a_missing_data_root(tmp_path: Path) -> None:
    code, _, err = cli("serve", "--data-root", str(tmp_path / "nope"), "--state-dir", str(tmp_path))
    assert code == 2 and "--data-root" in err and "not a folder" in err


def test_token_file_is_created_owner_only_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGESEARCH_TOKEN", raising=False)
    path = tmp_path / "state" / "token"
    token, created = load_or_create_token(path)
    assert created and len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(path) == (token, False)
    monkeypatch.setenv("MERGESEARCH_TOKEN", "from-the-environment-123")
    assert load_or_create_token(path) == ("from-the-environment-123", False)
    monkeypatch.setenv("MERGESEARCH_TOKEN", "short")
    with pytest.raises(ValueError, match="at least 16 characters"):
        load_or_create_token(path)
    monkeypatch.delenv("MERGESEARCH_TOKEN")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable only by its owner"):
        load_or_create_token(path)

