"""One interface to a job archive for the CLI: a server over HTTP (`--server`) or the database itself (`--db`).

Both return the same JSON shapes (the API's), so every command has one code path and one way of printing.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Protocol

import httpx

from orchestrator.archive import Archive
from orchestrator.errors import Unavailable, UserError
from orchestrator.jobqueue import ArchiveQueue
from orchestrator.jobs import Jobs
from orchestrator.jobspec import JobError, load_yaml_text
from orchestrator.records import CandidateStatus, JobStatus, Kind
from orchestrator.service.auth import TOKEN_ENV
from orchestrator.service.confine import confine_job
from orchestrator.service.settings import DEFAULT_DATA_ROOT, DEFAULT_STATE_DIR

DEFAULT_TOKEN_FILE = DEFAULT_STATE_DIR / "token"


class ServerError(UserError):
    """The server refused a request; the message is its one-line reason."""


class ServerUnreachable(Unavailable):
    """The server could not be reached."""


class JobsClient(Protocol):
    def submit(self, job_file: Path, root: str | None = None) -> dict[str, Any]: ...
    def jobs(self, status: str | None = None) -> list[dict[str, Any]]: ...
    def job(self, job_id: int) -> dict[str, Any]: ...
    def candidates(
        self,
        job_id: int,
        kind: Kind | None = Kind.SEARCH,
        status: str | None = None,
        order: str = "fitness",
        descending: bool = True,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]: ...
    def best(self, job_id: int) -> dict[str, Any]: ...
    def cancel(self, job_id: int) -> dict[str, Any]: ...
    def resume(self, job_id: int) -> dict[str, Any]: ...
    def pull(self, job_id: int, out: Path, candidate: int | None = None) -> Path: ...


class LocalJobs:
    """Straight to the archive, through the application layer (`Jobs`) with the archive's own queue: `submit`
    and `resume` queue jobs for a server that uses this database.

    A job queued here is held to a server's rules: its paths must lie under `data_roots` (the server's, which
    checks them again, with its own code and remote-code settings, when it admits the job).
    """

    def __init__(self, archive: Archive, data_roots: list[Path] | None = None) -> None:
        self.archive = archive
        self.layer = Jobs(archive, ArchiveQueue(archive))
        self.data_roots = data_roots or [DEFAULT_DATA_ROOT]

    def submit(self, job_file: Path, root: str | None = None) -> dict[str, Any]:
        if not job_file.is_file():
            raise JobError(f"{job_file}: job file not found")
        spec = confine_job(
            load_yaml_text(job_file.read_bytes(), str(job_file)), self.data_roots,
            Path(root) if root else job_file.resolve().parent, allow_remote_code=True, source=str(job_file),
            allow_task_code=True,
        )
        return self.layer.submit(spec).model_dump(mode="json")

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        return [v.model_dump(mode="json") for v in self.layer.jobs(JobStatus(status) if status else None)]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.layer.job(job_id).model_dump(mode="json")

    def candidates(
        self,
        job_id: int,
        kind: Kind | None = Kind.SEARCH,
        status: str | None = None,
        order: str = "fitness",
        descending: bool = True,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        page = self.layer.candidates(
            job_id, kind, CandidateStatus(status) if status else None, order, descending, limit, offset
        )
        return page.model_dump(mode="json")

    def best(self, job_id: int) -> dict[str, Any]:
        return self.layer.candidate(job_id).to_json()

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self.layer.cancel(job_id).model_dump(mode="json")

    def resume(self, job_id: int) -> dict[str, Any]:
        return self.layer.resume(job_id).model_dump(mode="json")

    def pull(self, job_id: int, out: Path, candidate: int | None = None) -> Path:
        return self.layer.pull(job_id, out, candidate)


class RemoteJobs:
    """A `mergesearch serve` at `url`, with the bearer token."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.url}: {exc}") from None
        return _checked(r).json()

    def submit(self, job_file: Path, root: str | None = None) -> dict[str, Any]:
        if not job_file.is_file():
            raise ServerError(f"{job_file}: job file not found")
        # Relative paths resolve, on the server, against the job file's folder unless told otherwise:
        # right when client and server share a filesystem, else pass --root.
        folder = root or str(job_file.resolve().parent)
        return self._call(
            "POST", "/jobs", content=job_file.read_bytes(), params={"root": folder},
            headers={"Content-Type": "application/yaml"},
        )

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/jobs", params={"status": status} if status else {})

    def job(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")

    def candidates(
        self,
        job_id: int,
        kind: Kind | None = Kind.SEARCH,
        status: str | None = None,
        order: str = "fitness",
        descending: bool = True,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        params = {"kind": kind, "status": status, "order": order, "descending": descending, "limit": limit,
                  "offset": offset}
        return self._call("GET", f"/jobs/{job_id}/candidates", params={k: v for k, v in params.items() if v is not None})

    def best(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}/best")

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def resume(self, job_id: int) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job_id}/resume")

    def pull(self, job_id: int, out: Path, candidate: int | None = None) -> Path:
        """Stream the model's tar into a temp folder beside `out`, then move it into place."""
        params = {"candidate": candidate} if candidate is not None else {}
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pull-") as tmp:
            try:
                with self.http.stream("GET", f"/jobs/{job_id}/model", params=params, timeout=None) as r:
                    _checked(r)
                    with tarfile.open(fileobj=_Reader(r.iter_bytes()), mode="r|") as tar:
                        tar.extractall(tmp, filter="data")
            except httpx.TransportError as exc:
                raise ServerUnreachable(f"cannot reach {self.url}: {exc}") from None
            (top,) = Path(tmp).iterdir()
            if out.exists():
                shutil.rmtree(out)
            shutil.move(top, out)
        return out


class _Reader:
    """A read()-able view of an iterator of byte chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Any) -> None:
        self.chunks = iter(chunks)
        self.buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buffer) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        data, self.buffer = (self.buffer, b"") if size < 0 else (self.buffer[:size], self.buffer[size:])
        return data


def _checked(r: httpx.Response) -> httpx.Response:
    if r.is_success:
        return r
    r.read()
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    if not isinstance(detail, str):  # FastAPI's validation errors: a list of {loc, msg}
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    raise ServerError(f"server said {r.status_code}: {detail}")


def client_token(token_file: Path = DEFAULT_TOKEN_FILE) -> str:
    """`MERGESEARCH_TOKEN`, else the token file a server on this machine wrote."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if token_file.is_file():
        return token_file.read_text().strip()
    raise ServerError(f"no token: set {TOKEN_ENV} to the server's token")


def jobs_client(server: str | None, db: str | None, data_roots: list[Path] | None = None) -> JobsClient:
    """The server when `--server` is given, else the archive at `--db` (or the default one), where submitted
    jobs may only name paths under `data_roots` (default: the server's default data root)."""
    if server:
        if db:
            raise ServerError("give --server or --db, not both")
        return RemoteJobs(server, client_token())
    return LocalJobs(Archive(db), data_roots)
