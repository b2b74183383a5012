"""The driver: one per job. It asks the strategy, keeps every worker busy, and records everything.

The archive is the source of truth: asking (candidates + strategy state) and finishing (result + state after
`tell`) are each one transaction, so a driver killed at any point resumes from the archive exactly where it
was: pending candidates are dispatched again, nothing is asked twice, nothing is counted twice.

The job's model is chosen on comparable data (ALGORITHMS.md §8's promotion): the strategy's candidates were
scored on dev chunks, maybe different ones, so the top `search.promote` of them and the best reference are
re-scored on the whole dev split as `final` rows, and the best of those is the job's model (`Archive.best`).
A static merge therefore wins whenever the search found nothing better.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.archive import Archive
from orchestrator.archive import Candidate as Row
from orchestrator.jobs import job_report
from orchestrator.jobspec import JobSpec, ObjectiveSpec
from orchestrator.pool import Completion, Pool, Work
from orchestrator.records import CandidateStatus, Evaluation, Failure, JobStatus, Kind, outcome
from search.base import Candidate, Reference, Result, StrategyBase, make_strategy
from search.space import SearchSpace
from workers.recipe import FORMAT, Recipe, RecipeFormat, canonical_hash

if TYPE_CHECKING:
    from orchestrator.launch import RunSettings

TA_LAMBDA = 0.3
"""Task arithmetic's scale for the reference: the task-arithmetic paper picks lambda in [0.3, 0.5] on
validation data; 0.3 is the conservative end, which suits several experts at once."""


def reference_recipes(experts: list[str], num_layers: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The static references every job reports: the base, each expert alone, uniform average, TA and TIES."""

    def whole(op: str, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "models": {"base": "base", "experts": experts},
            "layers": [{"from": i, "op": op, "params": params} for i in range(num_layers)],
            "rest": {"op": op, "params": params},
            "seed": seed,
        }

    k = len(experts)
    refs = {"base": whole("copy", {"model": "base"})}
    refs.update({f"expert:{e}": whole("copy", {"model": e}) for e in experts})
    refs["uniform"] = whole("linear", {"weights": [1.0] * k})
    refs["task_arithmetic"] = whole("task_arithmetic", {"weights": [1.0] * k, "lambda": TA_LAMBDA})
    refs["ties"] = whole("ties", {"weights": [1.0] * k, "density": 0.2, "lambda": 1.0})
    return refs


@dataclass
class Objective:
    """The job's fitness of dev task scores: Σ_t w_t·s_t / Σ_t w_t, s_t optionally normalised between the
    base's and the best expert's score on t (`objective.normalize: base_expert`, after `calibrate`)."""

    spec: ObjectiveSpec
    low: dict[str, float] = field(default_factory=dict)
    span: dict[str, float] = field(default_factory=dict)

    def calibrate(self, references: dict[str, dict[str, float]]) -> None:
        """Set the normalisation from the references' dev scores (name → task → score)."""
        if self.spec.normalize == "none":
            return
        if "base" not in references:
            raise RuntimeError("objective.normalize: the base reference has no score (its evaluation failed)")
        experts = [scores for name, scores in references.items() if name.startswith("expert:")]
        for task, base in references["base"].items():
            best = max((e.get(task, base) for e in experts), default=base)
            self.low[task], self.span[task] = base, (best - base if best - base > 1e-6 else 1.0)

    def __call__(self, dev: dict[str, float] | None) -> float:
        if not dev:
            return 0.0
        weights = {t: self.spec.weights.get(t, 1.0) for t in dev}
        total = sum(weights.values()) or 1.0
        scaled = {t: (s - self.low.get(t, 0.0)) / self.span.get(t, 1.0) for t, s in dev.items()}
        return sum(weights[t] * scaled[t] for t in dev) / total


@dataclass
class Progress:
    """What a progress display needs after each event."""

    job_id: int
    done: int
    failed: int
    budget: int
    inflight: int
    best: float | None
    phase: str
    last: dict[str, Any] | None = None


@dataclass
class Driver:
    archive: Archive
    spec: JobSpec
    job_id: int
    pool: Pool
    settings: RunSettings
    """What the run derived from the spec at start (`launch.run_settings`): depth, dev chunk size."""
    on_progress: Callable[[Progress], None] | None = None
    should_stop: Callable[[], bool] = lambda: False
    """The job was cancelled: stop dispatching and mark it cancelled."""
    interrupted: Callable[[], bool] = lambda: False
    """The process hosting the driver is shutting down: stop dispatching but leave the job's status as it is,
    so the next start resumes it from the archive."""
    strategy: StrategyBase = field(init=False)
    inflight: dict[int, Work] = field(default_factory=dict, init=False)
    numbers: dict[int, int] = field(default_factory=dict, init=False)
    """archive candidate id → strategy number, for candidates the strategy waits on."""
    done: int = field(default=0, init=False)
    failed: int = field(default=0, init=False)
    best: float | None = field(default=None, init=False)
    objective: Objective = field(init=False)
    resumed: bool = field(default=False, init=False)
    deadline: float = field(default=float("inf"), init=False)
    """time.monotonic() after which nothing more is asked (`search.max_minutes`, over every run of the job:
    a resumed job has what its earlier runs left)."""

    def __post_init__(self) -> None:
        self.objective = Objective(self.spec.objective)
        space = SearchSpace(
            self.spec.space, self.settings.num_layers, "base", self.spec.expert_names(),
            seed=self.spec.search.seed, recipe_format=self.recipe_format(),
        )
        self.strategy = make_strategy(
            self.spec.search.strategy, space, self.spec.search.budget, self.spec.search.seed, self.spec.search.params
        )
        checkpoint = self.archive.last_checkpoint(self.job_id)
        if checkpoint is not None:
            self.strategy.load_state_dict(checkpoint.state)
            self.resumed = True
        counts = self.archive.counts(self.job_id)
        self.done, self.failed = counts.get(CandidateStatus.DONE, 0), counts.get(CandidateStatus.FAILED, 0)
        best = self.archive.best(self.job_id)
        self.best = best.fitness if best else None

    def recipe_format(self) -> RecipeFormat:
        """The format the job's search started with (a resumed job keeps it), else today's."""
        first = self.archive.first_recipe(self.job_id)
        return Recipe.parse(first).format if first else FORMAT

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.spec.search.max_minutes is not None:  # the time earlier drivers of the job ran counts too
            spent = self.archive.run_seconds(self.job_id)
            self.deadline = time.monotonic() + 60 * self.spec.search.max_minutes - spent
        self.archive.set_status(self.job_id, JobStatus.RUNNING)
        if self.spec.references:
            self._run_references()
            refs = self.archive.candidates(
                self.job_id, kind=Kind.REFERENCE, status=CandidateStatus.DONE, order="id"
            )
            self.objective.calibrate({c.name: c.dev for c in refs if c.name and c.dev})
            if not self.resumed and self.strategy.asked == 0:
                self.strategy.warm_start(self._references(refs))
        self._search()
        if not self._stopping():
            self._final_choice()
        if self.interrupted():
            return self.report()
        if self.should_stop():
            self.archive.set_status(self.job_id, JobStatus.CANCELLED)
            return self.report()
        self.archive.set_status(self.job_id, JobStatus.DONE)
        return self.report()

    def _references(self, rows: list[Row]) -> list[Reference]:
        """The finished references as the strategy's warm start, in name order. Each is numbered minus its
        archive id, so a child bred from one names it among its parents (the dashboard's lineage resolves it)."""
        rows = sorted(rows, key=lambda c: c.name or "")
        return [
            Reference(
                c.name or "",
                c.recipe,
                Result(
                    number=-c.id,
                    fitness=self.objective(c.dev),
                    scores=c.dev or {},
                    per_example=c.per_example or {},
                    sparsity=c.sparsity or 0.0,
                ),
                c.subset,
            )
            for c in rows
        ]

    def _run_references(self) -> None:
        existing = {c.name: c for c in self.archive.candidates(self.job_id, kind=Kind.REFERENCE)}
        rows = [
            {"kind": Kind.REFERENCE, "name": name, "recipe": recipe, "recipe_hash": canonical_hash(recipe)}
            for name, recipe in reference_recipes(
                self.spec.expert_names(), self.settings.num_layers, self.spec.search.seed
            ).items()
            if name not in existing
        ]
        if rows:
            self.archive.add_candidates(self.job_id, rows)
        pending = [c for c in self.archive.unfinished(self.job_id) if c.kind == Kind.REFERENCE]
        queue = [self._work(c.id, c.recipe, 0, ("dev", "test")) for c in pending]
        self._drain(queue, phase="references")

    def _search(self) -> None:
        # Resume: whatever was asked but not finished goes out again first.
        queue = [
            self._work(c.id, c.recipe, c.subset, ("dev", "test") if c.info.get("final") else ("dev",))
            for c in self.archive.unfinished(self.job_id)
            if c.kind == Kind.SEARCH
        ]
        for c in self.archive.unfinished(self.job_id):
            if c.kind == Kind.SEARCH and c.number is not None:
                self.numbers[c.id] = c.number
        while not self._stopping():
            free = self.pool.size - len(self.inflight) - len(queue)
            out_of_time = time.monotonic() > self.deadline
            if free > 0 and self.strategy.remaining() > 0 and not out_of_time:
                queue.extend(self._ask(free))
            self._dispatch(queue)
            if not self.inflight:
                if out_of_time:
                    self.archive.log(self.job_id, f"search.max_minutes reached after {self.done} evaluations")
                if self.strategy.done() or self.strategy.remaining() == 0 or out_of_time:
                    break
                raise RuntimeError(
                    f"strategy '{self.strategy.name}' asked for nothing with nothing in flight (not done)"
                )
            queue.extend(self._complete(self.pool.wait(timeout=1.0), tell=True))
            self._notify("search")

    def _drain(self, queue: list[Work], phase: str) -> None:
        """Run a fixed list of work (references, final tests) without the strategy."""
        while (queue or self.inflight) and not self._stopping():
            self._dispatch(queue)
            queue.extend(self._complete(self.pool.wait(timeout=1.0), tell=False))
            self._notify(phase)

    def _stopping(self) -> bool:
        return self.should_stop() or self.interrupted()

    def _ask(self, n: int) -> list[Work]:
        cands = self.strategy.ask(n)
        if not cands:
            return []
        rows = [_row(c) for c in cands]
        ids = self.archive.add_candidates(self.job_id, rows, self.strategy.state_dict(), self.strategy.told)
        for cid, cand in zip(ids, cands):
            self.numbers[cid] = cand.number
        return [
            self._work(cid, row["recipe"], c.subset, ("dev", "test") if c.info.get("final") else ("dev",))
            for cid, row, c in zip(ids, rows, cands)
        ]

    def _work(self, cand_id: int, recipe: dict[str, Any], subset: int, splits: tuple[str, ...]) -> Work:
        return Work(cand_id, recipe, subset, splits, self.settings.dev_subset)

    def _dispatch(self, queue: list[Work]) -> None:
        """Send queued work to the idle workers, marking it started in one transaction."""
        batch: list[Work] = []
        while queue and len(self.inflight) + len(batch) < self.pool.size:
            batch.append(queue.pop(0))
        if not batch:
            return
        self.archive.start_many([w.cand_id for w in batch], worker="pending")
        for work in batch:
            self.inflight[work.cand_id] = work
            self.pool.submit(work)

    def _complete(self, completions: list[Completion], tell: bool) -> list[Work]:
        """Record a batch of completions in one transaction, with the strategy state after telling them all.

        Returns the work whose worker was lost and which may be retried.
        """
        retry: list[Work] = []
        finished: list[tuple[int, dict[str, Any], dict[str, Any], bool]] = []
        results: list[Result] = []
        for completion in completions:
            work = completion.work
            self.inflight.pop(work.cand_id, None)
            if completion.lost is not None:
                cand = self.archive.candidate(work.cand_id)
                if cand.attempts < self.spec.workers.max_attempts:
                    self.archive.requeue(work.cand_id, f"worker lost ({completion.lost}); retrying")
                    self.archive.log(self.job_id, f"candidate {work.cand_id}: worker lost, retrying", "warning")
                    retry.append(work)
                    continue
                output: dict[str, Any] = {
                    "ok": False, "error": f"worker lost {cand.attempts} times ({completion.lost})"
                }
            else:
                assert completion.output is not None
                output = completion.output
            number = self.numbers.pop(work.cand_id, None) if tell else None
            scored = outcome(output, self.objective)
            if number is not None:
                results.append(_result(number, scored))
            finished.append((work.cand_id, output, scored.columns(), number is not None))
        if not finished:
            return retry
        state = None
        if results:
            self.strategy.tell(results)
            state = self.strategy.state_dict()
        recorded = set(
            self.archive.finish_many([(c, v) for c, _, v, _ in finished], state, self.strategy.told, self.job_id)
        )
        for cand_id, output, values, searched in finished:
            if cand_id not in recorded or not searched:
                continue
            if output.get("ok"):
                self.done += 1
                if self.best is None or values["fitness"] > self.best:
                    self.best = values["fitness"]
            else:
                self.failed += 1
                self.archive.log(self.job_id, f"candidate {cand_id} failed: {output.get('error')}", "warning")
        return retry

    def _final_choice(self) -> None:
        """Promote the finalists to the whole dev split, then score the winner on the held-out test split."""
        if not self.archive.candidates(self.job_id, kind=Kind.FINAL, limit=1):
            self.archive.add_candidates(self.job_id, self._finalists())
        pending = [c for c in self.archive.unfinished(self.job_id) if c.kind == Kind.FINAL]
        self._drain([self._work(c.id, c.recipe, -1, ("dev",)) for c in pending], phase="promotion")
        best = self.archive.best(self.job_id)
        if self._stopping() or best is None or best.kind != Kind.FINAL:
            return
        test = best.test
        if test is None:
            self.pool.submit(self._work(best.id, best.recipe, -1, ("test",)))
            while not (done := self.pool.wait(timeout=5.0)):
                pass
            out = done[0].output or {}
            if not out.get("ok"):
                error = out.get("error") or done[0].lost
                self.archive.log(self.job_id, f"test evaluation of the best candidate failed: {error}", "error")
                return
            test = out["test"]
        self.archive.set_test(best.id, test, dev_full=best.dev)
        self.best = best.fitness

    def _finalists(self) -> list[dict[str, Any]]:
        """Rows for the top `search.promote` distinct recipes by chunk fitness, and the best reference.

        A candidate already scored on the whole dev split (subset −1) keeps its scores instead of a rerun.
        """
        done = [c for c in self.archive.candidates(self.job_id, status=CandidateStatus.DONE)
                if c.kind in (Kind.SEARCH, Kind.REFERENCE)]
        ranked: dict[str, Row] = {}
        for c in sorted(done, key=lambda c: (-self.objective(c.dev), c.id)):
            ranked.setdefault(c.recipe_hash, c)
        chosen = list(ranked.values())[: self.spec.search.promote]
        best_reference = next((c for c in ranked.values() if c.kind == Kind.REFERENCE), None)
        if best_reference is not None and best_reference not in chosen:
            chosen.append(best_reference)
        rows = []
        for c in chosen:
            row: dict[str, Any] = {
                "kind": Kind.FINAL,
                "name": c.name or f"{c.kind} #{c.number}",
                "recipe": c.recipe,
                "recipe_hash": c.recipe_hash,
                "genome": c.genome,
                "subset": -1,
                "test": c.test,
                "info": {"source": c.id, "source_fitness": self.objective(c.dev), "source_subset": c.subset},
            }
            if c.subset == -1:
                row.update(status=CandidateStatus.DONE, dev=c.dev, fitness=self.objective(c.dev), per_example=c.per_example,
                           sparsity=c.sparsity)
            rows.append(row)
        return rows

    def _notify(self, phase: str) -> None:
        if self.on_progress:
            self.on_progress(
                Progress(
                    self.job_id,
                    self.done,
                    self.failed,
                    self.spec.search.budget,
                    len(self.inflight),
                    self.best,
                    phase,
                )
            )

    def report(self) -> dict[str, Any]:
        return job_report(self.archive, self.job_id)


def _row(c: Candidate) -> dict[str, Any]:
    return {
        "kind": Kind.SEARCH,
        "number": c.number,
        "recipe": c.recipe,
        "recipe_hash": canonical_hash(c.recipe),
        "genome": c.genome,
        "parents": c.parents,
        "generation": c.generation,
        "subset": c.subset,
        "info": c.info,
    }


def _result(number: int, scored: Evaluation | Failure) -> Result:
    """What the strategy is told of one scored (or failed) candidate."""
    if isinstance(scored, Failure):
        return Result(number=number, fitness=0.0, failed=True, error=scored.error)
    return Result(
        number=number,
        fitness=scored.fitness,
        scores=scored.dev,
        per_example=scored.per_example or {},
        sparsity=scored.sparsity or 0.0,
        cost=sum((scored.timings or {}).values()),
    )
