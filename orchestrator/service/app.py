"""The HTTP API: submit, list, watch, page through, cancel, resume and download jobs.

`create_app(settings)` builds the FastAPI app; the Ray connection and the drivers start with the app's
lifespan (uvicorn's startup) and stop with it. Every route but `/health` needs the bearer token
(`require_token`, which the dashboard's router, included when installed, applies to its own API). Errors are
JSON `{"detail": ...}`: 400 a bad job (naming the field), 401 no or a wrong token, 404 no such job or
candidate, 409 a request the job's state forbids, 413 a body over the limit, 422 bad query parameters, 500 a
candidate that cannot be materialized, 503 the database unreachable or the service starting. Errors of ours
map to their status in one place (`orchestrator.errors.OUTCOMES`).
"""

from __future__ import annotations

import importlib.util
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.archive import Archive
from orchestrator.errors import MergesearchError, outcome
from orchestrator.jobspec import import_registries, load_yaml_text
from orchestrator.launch import Cluster, RayCluster
from orchestrator.records import CandidateStatus, JobStatus, Kind
from orchestrator.service.auth import require_token
from orchestrator.service.bodylimit import BodyLimit
from orchestrator.service.confine import confine_job
from orchestrator.service.deps import ArchiveDep, JobsDep
from orchestrator.service.downloads import PulledModels, model_response
from orchestrator.service.scheduler import Scheduler
from orchestrator.service.settings import ServiceSettings
from orchestrator.views import CandidatePage, JobView, Offset, RowId

JOB_YAML = {
    "requestBody": {
        "required": True,
        "content": {"application/yaml": {"schema": {"type": "string", "description": "The job file, as for `run`."}}},
    }
}

api = APIRouter(dependencies=[Depends(require_token)])


@api.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request) -> dict[str, Any]:
    return request.app.openapi()


@api.post("/jobs", status_code=status.HTTP_201_CREATED, openapi_extra=JOB_YAML)
async def submit_job(
    request: Request,
    jobs: JobsDep,
    root: Annotated[
        str | None, Query(description="Server folder that relative paths resolve against (default: first data root).")
    ] = None,
) -> JobView:
    """Queue a job. Its models and tasks must lie under the server's data roots."""
    body = await request.body()
    settings: ServiceSettings = request.app.state.settings

    def accept() -> JobView:
        spec = confine_job(
            load_yaml_text(body), settings.data_roots, Path(root) if root else None,
            allow_remote_code=settings.allow_remote_code, allow_task_code=settings.allow_task_code,
        )
        return jobs.submit(spec)

    return await run_in_threadpool(accept)


@api.get("/jobs")
def list_jobs(
    jobs: JobsDep,
    job_status: Annotated[JobStatus | None, Query(alias="status", description="Only jobs in this status.")] = None,
) -> list[JobView]:
    return jobs.jobs(job_status)


@api.get("/jobs/{job_id}")
def get_job(job_id: RowId, jobs: JobsDep) -> JobView:
    """Progress: done / failed / budget, best fitness, queue position, workers, status."""
    return jobs.job(job_id)


@api.get("/jobs/{job_id}/candidates")
def list_candidates(
    job_id: RowId,
    jobs: JobsDep,
    kind: Kind | None = Kind.SEARCH,
    cand_status: Annotated[CandidateStatus | None, Query(alias="status")] = None,
    order: Literal["fitness", "id", "generation", "sparsity"] = "fitness",
    descending: bool = True,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[Offset, Query()] = 0,
) -> CandidatePage:
    """A page of a job's candidates, filtered, sorted and paged in SQL (no fitness sorts last)."""
    return jobs.candidates(job_id, kind, cand_status, order, descending, limit, offset)


@api.get("/jobs/{job_id}/best")
def best_candidate(job_id: RowId, jobs: JobsDep) -> dict[str, Any]:
    return jobs.candidate(job_id).to_json()


@api.get("/jobs/{job_id}/events")
def job_events(
    job_id: RowId, jobs: JobsDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, Any]]:
    """The job's log, newest first."""
    return jobs.events(job_id, limit)


@api.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: RowId, jobs: JobsDep) -> JobView:
    """Cancel a queued job, or stop a running one at its driver's next step (its candidates stay archived)."""
    return jobs.cancel(job_id)


@api.post("/jobs/{job_id}/resume")
def resume_job(job_id: RowId, jobs: JobsDep) -> JobView:
    """Queue a cancelled or failed job again; it continues from its archive and last checkpoint."""
    return jobs.resume(job_id)


@api.get(
    "/jobs/{job_id}/model",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}, "description": "The model folder as a tar stream."}},
)
def download_model(
    job_id: RowId,
    request: Request,
    archive: ArchiveDep,
    candidate: Annotated[RowId | None, Query(description="Candidate id (default: the best).")] = None,
) -> StreamingResponse:
    """Pull a candidate (the best by default) into a Hugging Face folder and stream it as a tar."""
    return model_response(archive, request.app.state.models, job_id, candidate)


def health(request: Request) -> JSONResponse:
    """Liveness and the database's reachability; needs no token."""
    archive: Archive = request.app.state.archive
    scheduler: Scheduler | None = request.app.state.scheduler
    try:
        with archive.engine.connect() as conn:
            conn.execute(text("select 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return JSONResponse({"status": "degraded", "detail": f"database unreachable: {reason}"}, status_code=503)
    running = len(scheduler.running) if scheduler else 0
    return JSONResponse({"status": "ok", "running": running})


@contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Restore SIGTERM's and SIGINT's handlers (uvicorn's: stop accepting, run the shutdown, which stops the
    drivers and Ray) after the block, where Ray's core worker replaces them with a crash handler."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a server in a thread (tests): no handlers of its own
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def create_app(settings: ServiceSettings, cluster: Cluster | None = None) -> FastAPI:
    """The service app. `cluster` defaults to a Ray cluster (joined at `settings.ray_address`) at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(import_registries)
        with kept_signal_handlers():  # Ray's start installs its own, which dies on SIGTERM instead of draining
            workers = cluster or await run_in_threadpool(
                RayCluster, settings.ray_address, settings.unschedulable_seconds
            )
        scheduler = Scheduler(
            app.state.archive,
            workers,
            settings.max_running,
            rebalance_every=settings.rebalance_seconds,
            check=lambda spec: confine_job(
                spec, settings.data_roots, allow_remote_code=settings.allow_remote_code,
                allow_task_code=settings.allow_task_code, source="job",
            ),
            unschedulable_after=settings.unschedulable_seconds,
        )
        scheduler.start()
        app.state.scheduler = scheduler
        try:
            yield
        finally:
            app.state.scheduler = None
            await run_in_threadpool(scheduler.stop)
            workers.close()

    app = FastAPI(
        title="mergesearch",
        summary="Search for the best merge of fine-tuned checkpoints.",
        version="1",
        lifespan=lifespan,
        openapi_url=None,  # served below, behind the token like everything but /health
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.archive = Archive(settings.db, retries=settings.db_retries)
    app.state.scheduler = None
    app.state.models = PulledModels(settings.state_dir / "models")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_api_route("/health", health, methods=["GET"], tags=["health"])
    app.include_router(api)
    if importlib.util.find_spec("orchestrator.dashboard") is not None:
        from orchestrator.dashboard import router as dashboard

        app.include_router(dashboard)
    app.add_exception_handler(MergesearchError, _json_error)
    return app


async def _json_error(_request: Request, exc: Exception) -> JSONResponse:
    """Every error of ours as `{"detail": its line}` with its kind's status (`errors.OUTCOMES`)."""
    assert isinstance(exc, MergesearchError)
    return JSONResponse({"detail": str(exc)}, status_code=outcome(exc)[0])
