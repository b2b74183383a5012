"""Watching a search: the web dashboard (`router`, included by the service at `/`) and the live terminal view
(`orchestrator.dashboard.watch`)."""

from orchestrator.dashboard.routes import router

__all__ = ["router"]
