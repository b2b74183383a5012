"""The web dashboard: one static page at `/` and the JSON it draws, under `/dashboard/api` behind the token.

The page and its scripts are public (they hold nothing); the browser keeps the token in its session storage
and sends it as a bearer header, so without it the page can show only its login form. The browser polls
rather than listening to server-sent events because `EventSource` cannot send an Authorization header.
A model download is a plain link (a browser streams it to disk, however big), so it carries a short-lived
signature of the job, the candidate and an expiry, made with the token, instead of the header.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, StreamingResponse

from orchestrator.archive import Job
from orchestrator.dashboard import panels, queries
from orchestrator.jobs import Jobs
from orchestrator.records import CandidateStatus
from orchestrator.service.auth import require_token
from orchestrator.service.deps import ArchiveDep, JobsDep
from orchestrator.service.downloads import model_response
from orchestrator.views import Offset, RowId

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {p.name for p in STATIC.iterdir() if p.is_file()}
LINK_SECONDS = 120
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/dashboard/api", dependencies=[Depends(require_token)])


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


@router.get("/dashboard/static/{name}")
def static_file(name: str) -> FileResponse:
    """The page's own files only (a fixed list, so no path can reach outside the folder)."""
    if name not in STATIC_FILES:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no static file {name!r}")
    return FileResponse(STATIC / name, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


def with_timing(jobs: Jobs, found: list[Job]) -> list[dict[str, Any]]:
    """The API's job views plus elapsed and estimated remaining time."""
    return [
        {**view.model_dump(mode="json"), **queries.timing(jobs.archive, job, view.done + view.failed)}
        for view, job in zip(jobs.views(found), found)
    ]


@api.get("/jobs")
def job_list(jobs: JobsDep) -> list[dict[str, Any]]:
    return with_timing(jobs, jobs.archive.jobs())


@api.get("/jobs/{job_id}")
def job(job_id: RowId, jobs: JobsDep) -> dict[str, Any]:
    """The job's view, its tasks, and the reference and ideal scores its chart draws as lines."""
    found = jobs.archive.job(job_id)
    tasks = [t["name"] for t in found.spec.get("tasks", [])]
    return {
        "job": with_timing(jobs, [found])[0],
        "tasks": tasks,
        **queries.references(jobs.archive, job_id),
    }


@api.get("/jobs/{job_id}/curve")
def curve(
    job_id: RowId,
    archive: ArchiveDep,
    metric: Annotated[str, Query(description="'fitness' (mean dev score) or a task name.")] = "fitness",
    points: Annotated[int, Query(ge=2, le=2000)] = queries.CURVE_POINTS,
) -> dict[str, Any]:
    found = archive.job(job_id)
    tasks = [t["name"] for t in found.spec.get("tasks", [])]
    if metric != "fitness" and metric not in tasks:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, detail=f"metric {metric!r}: not 'fitness' nor a task {tasks}"
        )
    return queries.curve(archive, job_id, metric, points)


@api.get("/jobs/{job_id}/candidates")
def candidates(
    job_id: RowId,
    archive: ArchiveDep,
    cand_status: Annotated[CandidateStatus | None, Query(alias="status")] = None,
    order: Literal["fitness", "id", "generation", "sparsity"] = "fitness",
    descending: bool = True,
    limit: Annotated[int, Query(ge=1, le=500)] = 25,
    offset: Annotated[Offset, Query()] = 0,
) -> dict[str, Any]:
    """A page of the archive's table: search candidates without their recipes, sorted and paged in SQL."""
    archive.job(job_id)
    return queries.page(archive, job_id, cand_status, order, descending, limit, offset)


@api.get("/jobs/{job_id}/candidates/{cand_id}")
def candidate(job_id: RowId, cand_id: RowId, jobs: JobsDep) -> dict[str, Any]:
    """One candidate with its recipe heatmap, its lineage back to the seeds and its mergekit YAML."""
    cand = jobs.candidate(job_id, cand_id)
    return {
        "candidate": cand.to_json(),
        "heatmap": panels.recipe_heatmap(cand.recipe),
        "lineage": queries.lineage(jobs.archive, cand),
        "mergekit": panels.mergekit_export(cand.recipe, jobs.archive.job(job_id).spec),
    }


@api.get("/jobs/{job_id}/strategy")
def strategy(job_id: RowId, archive: ArchiveDep) -> dict[str, Any]:
    return panels.strategy_panel(archive, archive.job(job_id))


@api.get("/jobs/{job_id}/snapshot")
def snapshot(job_id: RowId, jobs: JobsDep) -> dict[str, Any]:
    """What `mergesearch status --watch --server` draws: progress, curves, top, running and failed ones."""
    return queries.snapshot(jobs.archive, jobs.job(job_id).model_dump(mode="json"))


def link_signature(token: str, job_id: int, candidate: int | None, expires: int) -> str:
    message = f"{job_id}:{'' if candidate is None else candidate}:{expires}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


@api.post("/jobs/{job_id}/download-link")
def download_link(
    job_id: RowId, request: Request, archive: ArchiveDep, candidate: RowId | None = None
) -> dict[str, str]:
    """A link that downloads the model (the best by default) without the header, for `LINK_SECONDS`."""
    archive.job(job_id)
    expires = int(time.time()) + LINK_SECONDS
    signature = link_signature(request.app.state.settings.token, job_id, candidate, expires)
    query = f"expires={expires}&signature={signature}" + (
        "" if candidate is None else f"&candidate={candidate}"
    )
    return {"url": f"/dashboard/download/{job_id}?{query}"}


@router.get("/dashboard/download/{job_id}")
def download(
    job_id: RowId,
    request: Request,
    archive: ArchiveDep,
    expires: int,
    signature: str,
    candidate: RowId | None = None,
) -> StreamingResponse:
    """The service's model download, for a link from `download_link` that has not expired."""
    expected = link_signature(request.app.state.settings.token, job_id, candidate, expires)
    if not hmac.compare_digest(signature, expected) or expires < time.time():
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="download link invalid or expired")
    return model_response(archive, request.app.state.models, job_id, candidate)


router.include_router(api)
