"""Model downloads: a candidate pulled once into a Hugging Face folder under the state dir, streamed as a tar
(by the API's `/jobs/{id}/model` and the dashboard's signed links alike)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from fastapi import HTTPException, status
from fastapi.responses import StreamingResponse

from orchestrator.archive import Archive, Candidate
from orchestrator.errors import MergesearchError
from orchestrator.jobs import Jobs
from orchestrator.service.tarstream import tar_stream


class PulledModels:
    """Pulled model folders under the state dir, written once each (to a temp name, then renamed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    def folder(self, archive: Archive, cand: Candidate) -> Path:
        from orchestrator.pull import pull

        name = f"job-{cand.job_id}-candidate-{cand.id}"
        final = self.root / name
        with self.guard:
            lock = self.locks.setdefault(name, threading.Lock())
        with lock:
            if not final.is_dir():
                partial = self.root / f".{name}.partial"
                shutil.rmtree(partial, ignore_errors=True)  # a pull cut short by a crash
                pull(archive, cand, partial)
                partial.rename(final)
        return final


def model_response(
    archive: Archive, models: PulledModels, job_id: int, candidate: int | None = None
) -> StreamingResponse:
    """A candidate of the job (the best by default) as a tar stream of its Hugging Face folder."""
    cand = Jobs(archive).pullable(job_id, candidate)
    try:
        folder = models.folder(archive, cand)
    except MergesearchError:
        raise
    except (ValueError, RuntimeError) as exc:  # SourceError, RecipeError, MaterializeError: sources changed
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR, detail=f"cannot materialize candidate {cand.id}: {exc}"
        ) from None
    name = f"job-{job_id}-candidate-{cand.id}"
    return StreamingResponse(
        tar_stream(folder, name),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar"'},
    )
