"""qwenrun.engines.vllm.preflight: the checks and adjustments before vLLM starts (no engine is started here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwenrun import cli
from qwenrun.engines.vllm.preflight import (
    check_devices,
    check_model_path,
    platform_kwargs,
    seeds_crash,
    sigint_blocked,
)
from qwenrun.errors import EngineError
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent


def spec_of(model: dict[str, object] | None = None, **engine: object) -> AgentSpec:
    return AgentSpec.from_dict({"model": model or {"path": "Qwen/Qwen2.5-7B-Instruct"}, "engine": engine},
                               source="agent.yaml")  # fmt: skip


@pytest.mark.parametrize(
    "path", ["Qwen/Qwen2.5-7B-Instruct", "gpt2", "org/model.v1-x_y"], ids=["repo", "bare-name", "odd-repo"]
)
def test_repo_ids_and_existing_paths_pass(path: str, tmp_path: Path) -> None:
    check_model_path(spec_of({"path": path}))
    check_model_path(spec_of({"path": str(tmp_path), "tokenizer": str(tmp_path)}))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/models/qwen", "agent.yaml: model.path: '/models/qwen' does not exist and is not a Hugging Face repo id "
                         "(like Qwen/Qwen2.5-7B-Instruct)"),
        ("models/a/b", f"agent.yaml: model.path: 'models/a/b' does not exist (relative to {os.getcwd()}) and is not "
                       "a Hugging Face repo id (like Qwen/Qwen2.5-7B-Instruct)"),
        (".cache/tiny-qwen2-missing", f"agent.yaml: model.path: '.cache/tiny-qwen2-missing' does not exist (relative "
                                      f"to {os.getcwd()}) and is not a Hugging Face repo id (like "
                                      "Qwen/Qwen2.5-7B-Instruct); build the tiny test model with: qwenrun tiny-model "
                                      ".cache/tiny-qwen2-missing"),
    ],
)  # fmt: skip
def test_a_missing_local_model_says_so(path: str, message: str) -> None:
    with pytest.raises(EngineError) as info:
        check_model_path(spec_of({"path": path}))
    assert str(info.value) == message


def test_qwenrun_run_with_a_missing_model_fails_fast_and_clearly() -> None:
    tiny = ROOT / "agents" / "weather-tiny.yaml"
    result = CliRunner().invoke(cli.main, ["run", str(tiny), "--set", "model.path=/nowhere/tiny-qwen2", "-p", "hi"])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        "Error: " + str(tiny) + ": model.path: '/nowhere/tiny-qwen2' does not exist and is not a Hugging Face "
        "repo id (like Qwen/Qwen2.5-7B-Instruct); build the tiny test model with: qwenrun tiny-model "
        "/nowhere/tiny-qwen2"
    )
    assert "HFValidationError" not in result.output and "Traceback" not in result.output


def test_more_workers_than_devices_fail_before_vllm_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    if current_platform.is_cpu():
        from vllm.utils.cpu_resource_utils import get_visible_memory_node

        have, what = len(get_visible_memory_node()), "NUMA node"
    else:
        have, what = current_platform.device_count(), current_platform.device_name
    with pytest.raises(EngineError) as info:
        check_devices(spec_of(tensor_parallel_size=have + 1))
    assert str(info.value).startswith(
        "agent.yaml: engine: tensor_parallel_size x pipeline_parallel_size x data_parallel_size = "
        f"{have + 1} x 1 x 1 = {have + 1} workers, but this machine has {have} {what}"
    )
    check_devices(spec_of(tensor_parallel_size=have))
    check_devices(spec_of(tensor_parallel_size=have + 1, distributed_executor_backend="ray"))  # other nodes


def test_cpu_engines_schedule_every_prompt_whole() -> None:
    from vllm.platforms import current_platform

    expected = {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}
    assert platform_kwargs(spec_of()) == expected
    assert not seeds_crash(spec_of())
    again = spec_of(extra={"enable_chunked_prefill": True})
    assert platform_kwargs(again) == {}  # the file decides
    assert seeds_crash(again) == current_platform.is_cpu()


def _sigint_blocked_in(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
    return bool(blocked & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_processes_started_in_sigint_blocked_never_see_ctrl_c() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with sigint_blocked():
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _sigint_blocked_in(child.pid)
        os.kill(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the process group
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1)  # still alive
    finally:
        child.kill()
        child.wait()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before  # this thread's mask is back


SPAWN = """
import multiprocessing, time
from qwenrun.engines.vllm.preflight import sigint_blocked

if __name__ == "__main__":
    with sigint_blocked():  # as vLLM starts its engine core: multiprocessing, "spawn"
        child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(30,))
        child.start()
    print(child.pid, flush=True)
    child.join()
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_multiprocessing_children_never_see_ctrl_c(tmp_path: Path) -> None:
    """multiprocessing's resource tracker unblocks SIGINT when it starts: the mask must survive it."""
    script = tmp_path / "spawn.py"
    script.write_text(SPAWN)
    pid = 0
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            pid = int(parent.stdout.readline())
            assert _sigint_blocked_in(pid)
        finally:
            parent.kill()
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
