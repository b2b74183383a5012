"""Shared by the service, fault and cluster tests: a data root with tiny synthetic models and a task, job
YAML for it, and an in-process cluster whose workers score recipes by a hash (no model runs)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from orchestrator.jobspec import JobSpec
from orchestrator.pool import LocalPool, Pool, PoolStopped, Work
from tests.workers.synthetic import make_models, tiny_config
from workers.recipe import canonical_hash

TOKEN = "test-token-0123456789abcdef"


SLOW_EXAMPLES = 256
"""Dev examples a `slow` job scores per candidate: about 0.7 s on one core (32 examples took 0.1 s, so a job
could end between two polls of a fault test, before it could kill anything)."""


def make_data_root(root: Path, examples: int = 8) -> Path:
    """Synthetic base + 2 experts and one generation task ('echo') under `root`."""
    make_models(root / "models", n_experts=2, config=tiny_config(layers=2, hidden=32))
    task = root / "tasks" / "echo"
    task.mkdir(parents=True)
    for split in ("dev", "test"):
        lines = [json.dumps({"prompt": f"{w} ", "target": w}) for w in ["abc", "hello", "zz", "mergesearch"] * examples]
        (task / f"{split}.jsonl").write_text("\n".join(lines[:examples]) + "\n")
    return root


def job_data(
    budget: int = 6, workers: int = 2, name: str = "job", slow: bool = False, **extra: Any
) -> dict[str, Any]:
    """A job over `make_data_root`'s files, with paths relative to the data root.

    `slow`: score `SLOW_EXAMPLES` examples of 48 generated tokens (a data root made with that many).
    """
    data: dict[str, Any] = {
        "name": name,
        "models": {"base": "models/base", "experts": {"e0": "models/expert0", "e1": "models/expert1"}},
        "tasks": [{"name": "echo", "path": "tasks/echo", "max_new_tokens": 48 if slow else 4}],
        "search": {"strategy": "random", "budget": budget, "seed": 1},
        "workers": {"count": workers, "num_cpus": 1},
        "evaluation": {"dev_subset": SLOW_EXAMPLES if slow else 4, "batch_size": 32 if slow else 4},
        "references": False,
    }
    data.update(extra)
    return data


def job_yaml(**kwargs: Any) -> str:
    return yaml.safe_dump(job_data(**kwargs))


def hashed_score(work: Work) -> dict[str, Any]:
    """A worker output whose fitness is a stable function of the recipe (distinct recipes, distinct scores)."""
    x = int(canonical_hash(work.recipe)[:8], 16) / 0xFFFFFFFF
    out: dict[str, Any] = {"ok": True, "dev": {"echo": x}, "per_example": {"echo": [x]}, "sparsity": 0.0,
                           "timings": {"evaluate": 0.0}, "worker": "local"}
    if "test" in work.splits:
        out["test"] = {"echo": x}
    return out


class FakeCluster:
    """A cluster of `cpus` one-CPU slots whose pools evaluate in the driver's thread.

    `gate` holds evaluations while cleared (all of them, or those after the first `free` ones), so a test can
    keep jobs running as long as it needs.
    """

    def __init__(self, cpus: int = 4, delay: float = 0.0) -> None:
        self.cpus = cpus
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.free = 0
        self.evaluated = 0
        self.pools: dict[str, LocalPool] = {}
        self.job_gates: dict[str, threading.Event] = {}
        """Per job name: evaluations of that job wait while its gate is cleared."""
        self.start_gates: dict[str, threading.Event] = {}
        """Per job name: its pool starts only once its gate is set (as a Ray pool waits for its workers)."""

    def capacity(self) -> dict[str, float]:
        return {"CPU": float(self.cpus)}

    def pool(self, spec: JobSpec, workers: int, should_stop: Callable[[], bool] = lambda: False) -> Pool:
        start = self.start_gates.get(spec.name)
        while start is not None and not start.wait(0.05):
            if should_stop():
                raise PoolStopped("stopped while its workers were starting")
        gate = self.job_gates.get(spec.name)
        if gate is None:
            gate = self.job_gates[spec.name] = threading.Event()
            gate.set()

        def evaluate(work: Work) -> dict[str, Any]:
            gate.wait()
            return self.evaluate(work)

        self.pools[spec.name] = LocalPool(evaluate, workers)
        return self.pools[spec.name]

    def hold(self, job_name: str) -> threading.Event:
        """Hold the evaluations of job `job_name` (from its start) until the returned gate is set."""
        gate = self.job_gates.setdefault(job_name, threading.Event())
        gate.clear()
        return gate

    def hold_start(self, job_name: str) -> threading.Event:
        """Keep the pool of job `job_name` starting until the returned gate is set."""
        gate = self.start_gates[job_name] = threading.Event()
        return gate

    def hold_after(self, n: int) -> None:
        """Let `n` more evaluations through, then hold the rest until `gate.set()`."""
        self.free = self.evaluated + n
        self.gate.clear()

    def evaluate(self, work: Work) -> dict[str, Any]:
        self.evaluated += 1
        if self.evaluated > self.free:
            self.gate.wait()
        time.sleep(self.delay)
        return hashed_score(work)

    def close(self) -> None:
        self.gate.set()


def wait_for(predicate: Any, timeout: float = 30.0, every: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy and return it; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {getattr(predicate, '__name__', predicate)}")
