"""Bearer-token auth: one shared token, from `MERGESEARCH_TOKEN` or generated once into an owner-only file.

The token is compared with `secrets.compare_digest`, so the time a wrong token takes to refuse says nothing
about how much of it was right.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

TOKEN_ENV = "MERGESEARCH_TOKEN"
MIN_LENGTH = 16
bearer = HTTPBearer(auto_error=False, description=f"The server's token ({TOKEN_ENV}, or the token file).")


def load_or_create_token(token_file: Path) -> tuple[str, bool]:
    """The token from `MERGESEARCH_TOKEN`, else from `token_file`, else a new one written there (mode 0600).

    Returns (token, created): the caller prints a created token once; it is never printed again.
    """
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        if len(env) < MIN_LENGTH:
            raise ValueError(f"{TOKEN_ENV}: at least {MIN_LENGTH} characters, please (e.g. openssl rand -hex 32)")
        return env, False
    if token_file.is_file():
        mode = token_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(f"{token_file}: token file must be readable only by its owner (chmod 600; it is {mode:o})")
        return token_file.read_text().strip(), False
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """FastAPI dependency: 401 unless the request carries `Authorization: Bearer <the server's token>`."""
    expected: str = request.app.state.settings.token
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="wrong bearer token" if given else "missing bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
