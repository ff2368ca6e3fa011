"""qwenrun.engines.vllm.preflight: the checks and adjustments before vLLM starts (one test starts an
engine: the dtype it chose)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import started_engine

from qwenrun import cli
from qwenrun.engines.vllm import preflight
from qwenrun.engines.vllm.preflight import (
    DtypeChoice,
    check_devices,
    check_model_path,
    choose_dtype,
    cpu_flags,
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
    assert platform_kwargs(spec_of(dtype="float32")) == expected
    assert not seeds_crash(spec_of())
    again = spec_of(dtype="float32", extra={"enable_chunked_prefill": True})
    assert platform_kwargs(again) == {}  # the file decides
    assert seeds_crash(again) == current_platform.is_cpu()


# -- the dtype on CPUs ---------------------------------------------------------------------------

AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})  # an AMD EPYC without AVX-512, say
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
ON_X86 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="reads this machine's x86 CPU flags"
)


def test_auto_on_a_cpu_without_native_bf16_is_float32_and_says_why() -> None:
    choice = choose_dtype("auto", on_cpu=True, flags=AVX2, machine="x86_64")
    assert choice == DtypeChoice(
        "float32",
        "CPU engine: dtype auto is float32: this CPU has no native bfloat16 (no avx512_bf16 or "
        "amx_bf16 among its flags), so bfloat16 would be emulated, about 3x slower",
    )
    arm = choose_dtype("auto", on_cpu=True, flags=frozenset({"fp", "asimd"}), machine="aarch64")
    assert arm.dtype == "float32" and "no bf16 among its flags" in (arm.message or "")


@pytest.mark.parametrize(
    ("flags", "machine", "has"),
    [(SAPPHIRE_RAPIDS, "x86_64", "avx512_bf16, amx_bf16"), (AVX2 | {"avx512_bf16"}, "x86_64", "avx512_bf16"),
     (frozenset({"asimd", "bf16"}), "aarch64", "bf16")],
    ids=["amx", "avx512-bf16", "arm-bf16"],
)  # fmt: skip
def test_auto_on_a_cpu_with_native_bf16_is_vllms_choice(flags: frozenset[str], machine: str, has: str) -> None:
    choice = choose_dtype("auto", on_cpu=True, flags=flags, machine=machine)
    assert choice == DtypeChoice("auto", f"CPU engine: dtype auto is vLLM's choice: this CPU has native bfloat16 ({has})")
    assert choose_dtype("bfloat16", on_cpu=True, flags=flags, machine=machine) == DtypeChoice("bfloat16")


def test_explicit_bf16_without_native_bf16_stays_with_one_warning() -> None:
    choice = choose_dtype("bfloat16", on_cpu=True, flags=AVX2, machine="x86_64")
    assert choice == DtypeChoice(
        "bfloat16",
        "engine.dtype is bfloat16, but this CPU lacks avx512_bf16 or amx_bf16: vLLM emulates bfloat16 "
        "on it, about 3x slower than float32 (engine.dtype: auto picks float32 here)",
        warning=True,
    )


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float16", "half", "float32", "float"])
def test_a_gpu_keeps_the_files_dtype_and_says_nothing(dtype: str) -> None:
    for flags in (AVX2, SAPPHIRE_RAPIDS, None):
        assert choose_dtype(dtype, on_cpu=False, flags=flags, machine="x86_64") == DtypeChoice(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float", "float16"])
def test_other_dtypes_on_a_cpu_are_the_files(dtype: str) -> None:
    assert choose_dtype(dtype, on_cpu=True, flags=AVX2, machine="x86_64") == DtypeChoice(dtype)


def test_unknown_cpu_flags_leave_auto_to_vllm() -> None:
    for flags, machine in ((None, "x86_64"), (AVX2, "riscv64")):
        choice = choose_dtype("auto", on_cpu=True, flags=flags, machine=machine)
        assert choice.dtype == "auto" and "not known" in (choice.message or ""), choice
        assert choose_dtype("bfloat16", on_cpu=True, flags=flags, machine=machine) == DtypeChoice("bfloat16")


def test_cpu_flags_reads_proc_cpuinfo() -> None:
    flags = cpu_flags()
    if not Path("/proc/cpuinfo").exists():
        assert flags is None
        return
    assert flags, "no flags line in /proc/cpuinfo"
    assert flags <= set(Path("/proc/cpuinfo").read_text().split())


@ON_X86
def test_platform_kwargs_gives_vllm_the_choice_and_says_it_once(caplog: pytest.LogCaptureFixture) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM runs on a GPU here: the dtype is the file's")
    caplog.set_level(logging.INFO, logger="qwenrun.engines.vllm.preflight")
    assert platform_kwargs(spec_of(), read_flags=lambda: AVX2) == {"dtype": "float32", "enable_chunked_prefill": False}
    said = [record for record in caplog.records if "dtype" in record.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [(logging.INFO, choose_dtype(
        "auto", on_cpu=True, flags=AVX2, machine="x86_64").message)]  # fmt: skip
    caplog.clear()
    assert platform_kwargs(spec_of(), read_flags=lambda: SAPPHIRE_RAPIDS) == {"enable_chunked_prefill": False}
    assert [r.levelno for r in caplog.records if "dtype" in r.getMessage()] == [logging.INFO]
    caplog.clear()
    assert platform_kwargs(spec_of(dtype="bfloat16"), read_flags=lambda: AVX2) == {"enable_chunked_prefill": False}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "lacks avx512_bf16" in warnings[0].getMessage(), caplog.records


@ON_X86
@pytest.mark.engine
async def test_a_started_engine_reports_the_dtype_it_chose(
    tiny_spec: AgentSpec, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The tiny model (a float32 checkpoint) with dtype auto on a CPU said to lack native bfloat16:
    vLLM computes in float32 (its own choice on a CPU would be bfloat16), and the engine says why."""
    data = tiny_spec.model_dump()
    data["engine"]["dtype"] = "auto"
    spec = AgentSpec.from_dict(data, source="tests/tiny-auto.yaml")
    monkeypatch.setattr(preflight, "cpu_flags", lambda: AVX2)
    caplog.set_level(logging.INFO, logger="qwenrun")
    async with started_engine(spec) as engine:
        assert engine.dtype == "float32"
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("qwenrun")]
    assert "CPU engine: dtype auto is float32: this CPU has no native bfloat16" in "\n".join(messages), messages
    assert any(m.startswith("vLLM engine ready: tiny-qwen2 (float32, ") for m in messages), messages


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
