"""`qwenrun eval` with the real model (Qwen2.5-Coder-0.5B-Instruct) on the committed BFCL sample
(tests/data/bfcl: 5 simple_python cases), through the agent loop and the OpenAI server, on the
session's shared real engine (``real_model_dir`` / ``real_engine`` of tests/conftest.py, started from
agents/weather-small.yaml: its engine arguments are those of agents/bfcl.yaml but a progress bar)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.evals.bfcl import import_bfcl
from qwenrun.evals.evaluate import evaluate
from qwenrun.evals.readers import meant_a_call
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "bfcl"

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("via", ["agent", "server"])
async def test_eval_on_a_bfcl_sample(real_engine: VLLMEngine, real_model_dir: Path, via: str) -> None:
    spec = AgentSpec.from_file(ROOT / "agents" / "bfcl.yaml", [f"model.path={real_model_dir}"])
    cases = import_bfcl(DATA, ["simple_python"])
    report = await evaluate(spec, cases, via="server" if via == "server" else "agent", engine=real_engine)
    assert [result.id for result in report.results] == [case.id for case in cases]
    assert report.total is not None and report.total.errors == 0
    for case, result in zip(cases, report.results, strict=True):
        # every question of the sample asks for its one function: the model means to call it
        assert meant_a_call(result.text, case.tool_names), result.text
        assert result.latency_s > 0
    # The model writes fenced JSON calls (vLLM's Hermes parser reads none of them, see
    # benchmarks/RESULTS.md); qwenrun reads every one, and at least 4 of the 5 are right.
    assert report.total.format_failures["qwenrun"] == 0
    assert report.total.passed["qwenrun"] >= max(4, report.total.passed["vllm-hermes"])
    table = report.table()
    assert f"qwenrun eval: 5 cases via {via}, model qwen2.5-coder-0.5b" in table
