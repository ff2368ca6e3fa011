"""Evaluate: run cases on an engine through a path, score them for qwenrun and vLLM's parser."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from qwenrun.engines.base import Engine
from qwenrun.engines.registry import create_engine
from qwenrun.evals.cases import Case
from qwenrun.evals.report import CaseResult, Report, judge, summarize
from qwenrun.evals.runner import Via, run_cases
from qwenrun.spec.agent_file import AgentSpec

__all__ = ["evaluate"]


async def _tokenizer(engine: Engine, spec: AgentSpec) -> Any:
    """The engine's tokenizer (vLLM's parser wants one), else the model folder's."""
    own = getattr(engine, "tokenizer", None)
    if callable(own):
        return await own()
    from transformers import AutoTokenizer

    name = spec.model.tokenizer or spec.model.path
    return await asyncio.to_thread(AutoTokenizer.from_pretrained, name)


async def evaluate(
    spec: AgentSpec,
    cases: Sequence[Case],
    *,
    via: Via = "agent",
    engine: Engine | None = None,
    concurrency: int = 1,
    on_result: Callable[[CaseResult], None] | None = None,
) -> Report:
    """Run ``cases`` on ``engine`` (default: a vLLM engine of ``spec``, started and shut down
    here) through ``via`` and score them for qwenrun and for vLLM's Hermes parser."""
    from qwenrun.evals.readers import VLLMHermesReader

    own = engine is None
    if engine is None:
        engine = create_engine(spec)
    try:
        await engine.start()
        vllm = VLLMHermesReader(await _tokenizer(engine, spec))
        results: dict[str, CaseResult] = {}

        def done(outcome: Any) -> None:
            result = results[outcome.case.id] = judge(outcome, [vllm])
            if on_result is not None:
                on_result(result)

        await run_cases(spec, engine, cases, via=via, concurrency=concurrency, on_outcome=done)
    finally:
        if own:
            await engine.shutdown()
    ordered = [results[case.id] for case in cases]
    report = summarize(via, spec.served_model_name, ordered, ["qwenrun", vllm.name])
    sampling = spec.sampling
    report.meta = {"concurrency": concurrency, "tool_choice": spec.agent.tool_choice,
                   "temperature": sampling.temperature, "max_tokens": sampling.max_tokens}  # fmt: skip
    if spec.agent.tool_choice_rules:
        report.meta["tool_choice_rules"] = [rule.model_dump() for rule in spec.agent.tool_choice_rules]
    return report
