"""Scores of an eval run: each case judged for qwenrun's reading and vLLM's, summed per category.

Per category and reader: accuracy (cases passed / cases), format failures (the model's text meant
a call, see :func:`qwenrun.evals.readers.meant_a_call`, but the reader read none), and the mean
and median latency of the path (the same raw outputs are read by both readers). ``table()`` is the
text the CLI prints, ``to_dict()`` the ``--json`` report.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from qwenrun.evals.cases import Case
from qwenrun.evals.checker import CheckedCall, check
from qwenrun.evals.readers import Reading, reading
from qwenrun.evals.runner import Outcome

__all__ = ["CaseResult", "Report", "judge", "summarize"]

QWENRUN = "qwenrun"


class TextReader(Protocol):
    """Reads calls out of raw model text (e.g. :class:`qwenrun.evals.readers.VLLMHermesReader`)."""

    name: str

    def read(self, case: Case, text: str) -> Reading: ...


@dataclass(frozen=True, slots=True)
class Judged:
    """What one reader read from a case's output and how it scored."""

    calls: list[CheckedCall]
    passed: bool
    format_failure: bool
    error: str = ""


@dataclass(slots=True)
class CaseResult:
    id: str
    category: str
    text: str
    latency_s: float
    model_calls: int
    repaired: bool
    error: str | None
    readers: dict[str, Judged]


def _judged(case: Case, found: Reading) -> Judged:
    verdict = check(case, found.calls)
    return Judged([(name, dict(arguments)) for name, arguments in found.calls], verdict.passed,
                  found.format_failure, verdict.error)  # fmt: skip


def judge(outcome: Outcome, others: Sequence[TextReader]) -> CaseResult:
    """Score qwenrun's reading of ``outcome`` and each other reader's reading of its raw text."""
    case = outcome.case
    readers: dict[str, Judged] = {}
    if outcome.error is not None:
        failed = Judged([], False, False, outcome.error)
        readers = {QWENRUN: failed, **{reader.name: failed for reader in others}}
    else:
        readers[QWENRUN] = _judged(case, reading(outcome.calls, outcome.text, case.tool_names))
        for reader in others:
            readers[reader.name] = _judged(case, reader.read(case, outcome.text))
    return CaseResult(case.id, case.category, outcome.text, outcome.latency_s, outcome.model_calls,
                      outcome.repaired, outcome.error, readers)  # fmt: skip


@dataclass(slots=True)
class CategoryScore:
    category: str
    cases: int
    passed: dict[str, int]
    format_failures: dict[str, int]
    errors: int
    latency_mean_s: float
    latency_p50_s: float

    def accuracy(self, reader: str) -> float:
        return self.passed[reader] / self.cases if self.cases else 0.0


def _score(category: str, results: Sequence[CaseResult], names: Sequence[str]) -> CategoryScore:
    latencies = [result.latency_s for result in results if result.error is None] or [0.0]
    return CategoryScore(
        category,
        len(results),
        {name: sum(result.readers[name].passed for result in results) for name in names},
        {name: sum(result.readers[name].format_failure for result in results) for name in names},
        sum(result.error is not None for result in results),
        statistics.fmean(latencies),
        statistics.median(latencies),
    )


@dataclass(slots=True)
class Report:
    via: str
    model: str
    readers: list[str]
    results: list[CaseResult]
    categories: list[CategoryScore] = field(default_factory=list)
    total: CategoryScore | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "via": self.via, "model": self.model, "readers": self.readers, "meta": self.meta,
            "categories": [asdict(score) for score in self.categories],
            "total": asdict(self.total) if self.total else None,
            "cases": [asdict(result) for result in self.results],
        }  # fmt: skip

    def table(self) -> str:
        """The scores as an aligned text table, one row per category and one for all cases."""
        head = ["category", "cases"]
        for name in self.readers:
            head += [name, "format fail"]
        head += ["errors", "latency mean", "p50"]
        rows = [head]
        for score in [*self.categories, *([self.total] if self.total and len(self.categories) > 1 else [])]:
            row = [score.category, str(score.cases)]
            for name in self.readers:
                row += [f"{score.passed[name]}/{score.cases} ({100 * score.accuracy(name):.1f}%)",
                        str(score.format_failures[name])]  # fmt: skip
            row += [str(score.errors), f"{score.latency_mean_s:.2f} s", f"{score.latency_p50_s:.2f} s"]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        title = f"qwenrun eval: {len(self.results)} cases via {self.via}, model {self.model}"
        return "\n".join([title, *lines])


def summarize(via: str, model: str, results: list[CaseResult], readers: Sequence[str]) -> Report:
    """The report of ``results``: one score per category (in order of appearance) and a total."""
    order: dict[str, list[CaseResult]] = {}
    for result in results:
        order.setdefault(result.category, []).append(result)
    names = list(readers)
    report = Report(via, model, names, results)
    report.categories = [_score(category, members, names) for category, members in order.items()]
    report.total = _score("all", results, names)
    return report
