"""Import layering that the code relies on: light commands stay light, the dashboard does not import the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.service.fixtures import TOKEN


def run_python(script: str) -> str:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "MERGESEARCH_TOKEN": TOKEN})
    return out.stdout.strip()


def test_light_commands_import_neither_torch_nor_ray(tmp_path: Path) -> None:
    """`status`, `cancel` and the like only talk to a server or the archive: they start in a fraction of the
    time a torch import takes."""
    commands = [["status", "--server", "http://127.0.0.1:9"], ["cancel", "1", "--db", f"sqlite:///{tmp_path}/a.db"]]
    out = run_python(
        "import sys\nfrom typer.testing import CliRunner\nfrom orchestrator.cli import app\n"
        f"codes = [CliRunner().invoke(app, args).exit_code for args in {commands!r}]\n"
        "print(codes, sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))\n"
    )
    assert out == "[3, 2] []", out  # the server is unreachable (3); job 1 is not found (2)


def test_the_dashboard_imports_neither_the_app_that_includes_it_nor_the_cluster() -> None:
    """The dashboard's routes read the archive through `Jobs`: importing them starts no Ray and loads no torch."""
    out = run_python(
        "import sys, orchestrator.dashboard\n"
        "print(sorted(m for m in ('orchestrator.service.app', 'ray', 'torch') if m in sys.modules))"
    )
    assert out == "[]", out
