"""The settings models of the ``engine:`` table, one per ``engine.kind`` (default ``vllm``).

Pure pydantic (no vLLM import): :mod:`qwenrun.spec` builds the agent file from these, and
:mod:`qwenrun.engines.registry` pairs each with the class that runs it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, PositiveFloat, PositiveInt, Tag

from qwenrun.spec.base import Settings

__all__ = ["EngineSpec", "OpenAIEngineSpec", "VLLMEngineSpec"]


class VLLMEngineSpec(Settings):
    """``engine.kind: vllm`` (the default): vLLM in this process; the other keys are passed to
    ``vllm.AsyncEngineArgs`` unchanged."""

    kind: Literal["vllm"] = "vllm"

    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    data_parallel_size: PositiveInt = 1
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: PositiveInt = 256
    max_model_len: PositiveInt | None = None
    enforce_eager: bool = False
    swap_space: float = Field(16, ge=0, description="GiB of CPU swap (ignored by vLLM versions without it).")
    seed: int | None = 0
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = None
    load_format: str = Field("auto", description="'auto', 'safetensors', 'dummy' (random weights) ...")
    available_devices: PositiveInt | None = Field(
        None, description="GPUs this deployment may use; checked against TP x PP x DP when given."
    )
    gpus_per_node: PositiveInt | None = Field(
        None, description="GPUs of one node; an engine larger than that must use Ray (not a vLLM argument)."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set before vLLM is imported."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM EngineArgs field, passed as is (false booleans included).",
    )

    def layout_problem(self) -> str | None:
        """How TP x PP x DP, the executor backend and the GPU counts contradict vLLM, if they do."""
        tp, pp, dp = self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size
        backend, node = self.distributed_executor_backend, self.gpus_per_node
        replica = f"tensor_parallel_size x pipeline_parallel_size = {tp} x {pp} = {tp * pp}"
        sizes = f"tensor_parallel_size x pipeline_parallel_size x data_parallel_size = {tp} x {pp} x {dp}"
        if self.available_devices is not None and tp * pp * dp > self.available_devices:
            return f"{sizes} = {tp * pp * dp} GPUs, but available_devices is {self.available_devices}"
        if backend == "uni" and tp * pp > 1:
            return f"distributed_executor_backend 'uni' runs 1 worker, but {replica} workers are needed"
        if backend == "external_launcher" and dp > 1:
            return (
                f"data_parallel_size {dp} needs distributed_executor_backend 'mp' or 'ray': with "
                "'external_launcher' every torchrun process is a data-parallel rank of its own and vLLM "
                "does not balance requests between them"
            )
        if node is not None and tp * pp > node and backend != "ray":
            return (
                f"{replica} GPUs exceed gpus_per_node {node}: a model replica spanning nodes needs "
                f"distributed_executor_backend: ray (it is {repr(backend) if backend else 'unset'})"
            )
        ray_dp = self.extra.get("data_parallel_backend") == "ray"
        if node is not None and tp * pp <= node < tp * pp * dp and not ray_dp:
            return (
                f"{sizes} = {tp * pp * dp} GPUs exceed gpus_per_node {node}: data-parallel ranks on several "
                "nodes need engine.extra.data_parallel_backend: ray (or a lower data_parallel_size and "
                "more replicas)"
            )
        return None


class OpenAIEngineSpec(Settings):
    """``engine.kind: openai``: the model runs behind an OpenAI-compatible endpoint elsewhere."""

    kind: Literal["openai"]
    base_url: str = Field(
        pattern=r"^https?://", description="The endpoint's base URL, e.g. http://vllm:8000/v1."
    )
    api_key_env: str | None = Field(None, description="Name of the env variable holding the API key.")
    model: str | None = Field(
        None, description="The model name the endpoint serves (default: model.served_model_name, else path)."
    )
    timeout_s: PositiveFloat = Field(600, description="Time limit of one model call.")
    max_retries: int = Field(2, ge=0, description="Retries of a failed connection or 5xx answer.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra JSON fields of every request (e.g. vLLM's top_k)."
    )


def _kind(value: Any) -> str:
    kind = value.get("kind", "vllm") if isinstance(value, dict) else getattr(value, "kind", "vllm")
    return kind if isinstance(kind, str) else "vllm"


EngineSpec = Annotated[
    Annotated[VLLMEngineSpec, Tag("vllm")] | Annotated[OpenAIEngineSpec, Tag("openai")],
    Discriminator(_kind),
]
"""The ``engine:`` table: one of the settings models below, by ``kind`` (default ``vllm``)."""
