"""`mergesearch serve`: the HTTP API with the job drivers, on a Ray head (or a local Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli import DbOption, app, err, user_errors
from orchestrator.service.settings import DEFAULT_DATA_ROOT, DEFAULT_STATE_DIR, ServiceSettings


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every one).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    db: DbOption = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (e.g. auto on a head node).")] = None,
    data_root: Annotated[
        list[Path] | None,
        typer.Option(help="Folder jobs may read models and tasks from (repeat for several). Default: ~/.mergesearch."),
    ] = None,
    max_running: Annotated[int, typer.Option(min=1, help="Jobs driven at once; later ones wait in order.")] = 2,
    allow_remote_code: Annotated[bool, typer.Option(help="Let jobs set trust_remote_code.")] = False,
    allow_task_code: Annotated[
        bool, typer.Option(help="Let lm-eval task files run Python (!function), in this process too.")
    ] = False,
    unschedulable_seconds: Annotated[
        float, typer.Option(min=1, help="Fail a job whose workers fit nowhere on the cluster after this long.")
    ] = 300.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 beyond).")] = 1 << 20,
    state_dir: Annotated[Path, typer.Option(help="Token file and pulled-model cache.")] = DEFAULT_STATE_DIR,
) -> None:
    """Run the HTTP API; every unfinished job in the archive resumes. Token: MERGESEARCH_TOKEN or STATE_DIR/token."""
    import uvicorn

    from orchestrator.service.app import create_app
    from orchestrator.service.auth import load_or_create_token

    roots = [r.expanduser().resolve() for r in (data_root or [DEFAULT_DATA_ROOT])]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"--data-root {root}: not a folder")
    token_file = state_dir / "token"
    token, created = load_or_create_token(token_file)
    if created:
        err.print(f"generated a token (stored in {token_file}, mode 0600; shown only now):\n{token}", soft_wrap=True)
    settings = ServiceSettings(
        db=db,
        ray_address=ray_address,
        data_roots=roots,
        max_running=max_running,
        token=token,
        allow_remote_code=allow_remote_code,
        allow_task_code=allow_task_code,
        unschedulable_seconds=unschedulable_seconds,
        max_body_bytes=max_body_bytes,
        state_dir=state_dir,
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
