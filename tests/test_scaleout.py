"""Scale-out engine specs: TP x PP x DP, the executor backend and the GPU counts checked together
(exact messages), and the exact ``AsyncEngineArgs`` keyword arguments vLLM receives for multi-GPU
and Ray layouts, constructed on the installed vLLM (no engine is started, no GPU is needed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qwenrun.cli import main
from qwenrun.engines.vllm.inputs import engine_kwargs
from qwenrun.errors import ConfigError
from qwenrun.spec.agent_file import AgentSpec

MODEL = "Qwen/Qwen2.5-72B-Instruct"
TP_PP_DP = "tensor_parallel_size x pipeline_parallel_size x data_parallel_size"


def spec_of(engine: dict[str, Any], model: str = MODEL) -> AgentSpec:
    return AgentSpec.from_dict({"model": {"path": model}, "engine": engine}, source="agent.yaml")


def error_of(engine: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        spec_of(engine)
    return str(info.value)


# -- the layout rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (
            {"tensor_parallel_size": 2, "data_parallel_size": 2, "available_devices": 2},
            f"agent.yaml: engine: {TP_PP_DP} = 2 x 1 x 2 = 4 GPUs, but available_devices is 2",
        ),
        (
            {"tensor_parallel_size": 2, "distributed_executor_backend": "uni"},
            "agent.yaml: engine: distributed_executor_backend 'uni' runs 1 worker, but "
            "tensor_parallel_size x pipeline_parallel_size = 2 x 1 = 2 workers are needed",
        ),
        (
            {"pipeline_parallel_size": 2, "distributed_executor_backend": "uni"},
            "agent.yaml: engine: distributed_executor_backend 'uni' runs 1 worker, but "
            "tensor_parallel_size x pipeline_parallel_size = 1 x 2 = 2 workers are needed",
        ),
        (
            {"data_parallel_size": 2, "distributed_executor_backend": "external_launcher"},
            "agent.yaml: engine: data_parallel_size 2 needs distributed_executor_backend 'mp' or 'ray': "
            "with 'external_launcher' every torchrun process is a data-parallel rank of its own and vLLM "
            "does not balance requests between them",
        ),
        (
            {"tensor_parallel_size": 8, "pipeline_parallel_size": 2, "gpus_per_node": 8},
            "agent.yaml: engine: tensor_parallel_size x pipeline_parallel_size = 8 x 2 = 16 GPUs exceed "
            "gpus_per_node 8: a model replica spanning nodes needs distributed_executor_backend: ray "
            "(it is unset)",
        ),
        (
            {"tensor_parallel_size": 4, "pipeline_parallel_size": 2, "gpus_per_node": 4,
             "distributed_executor_backend": "mp"},
            "agent.yaml: engine: tensor_parallel_size x pipeline_parallel_size = 4 x 2 = 8 GPUs exceed "
            "gpus_per_node 4: a model replica spanning nodes needs distributed_executor_backend: ray "
            "(it is 'mp')",
        ),
        (
            {"tensor_parallel_size": 2, "data_parallel_size": 4, "gpus_per_node": 4},
            f"agent.yaml: engine: {TP_PP_DP} = 2 x 1 x 4 = 8 GPUs exceed gpus_per_node 4: data-parallel "
            "ranks on several nodes need engine.extra.data_parallel_backend: ray (or a lower "
            "data_parallel_size and more replicas)",
        ),
        (
            {"tensor_parallel_size": 2, "data_parallel_size": 4, "gpus_per_node": 4,
             "distributed_executor_backend": "ray", "extra": {"data_parallel_backend": "mp"}},
            f"agent.yaml: engine: {TP_PP_DP} = 2 x 1 x 4 = 8 GPUs exceed gpus_per_node 4: data-parallel "
            "ranks on several nodes need engine.extra.data_parallel_backend: ray (or a lower "
            "data_parallel_size and more replicas)",
        ),
    ],
    ids=["devices", "uni-tp", "uni-pp", "launcher-dp", "node-unset", "node-mp", "dp-spill", "dp-spill-mp"],
)  # fmt: skip
def test_contradictory_layouts_have_exact_messages(engine: dict[str, Any], message: str) -> None:
    assert error_of(engine) == message


@pytest.mark.parametrize(
    "engine",
    [
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "data_parallel_size": 2, "available_devices": 8},
        {"distributed_executor_backend": "uni", "data_parallel_size": 2},
        {"tensor_parallel_size": 2, "distributed_executor_backend": "external_launcher"},
        {"tensor_parallel_size": 8, "pipeline_parallel_size": 2, "gpus_per_node": 8,
         "distributed_executor_backend": "ray"},
        {"tensor_parallel_size": 4, "data_parallel_size": 4, "gpus_per_node": 8,
         "extra": {"data_parallel_backend": "ray"}},
        {"tensor_parallel_size": 4, "data_parallel_size": 2, "gpus_per_node": 8},
        {"tensor_parallel_size": 8, "data_parallel_size": 2, "gpus_per_node": 4,
         "distributed_executor_backend": "ray", "extra": {"data_parallel_backend": "ray"}},
    ],
    ids=["fits", "uni-dp", "launcher-tp", "ray-2-nodes", "ray-dp", "one-node", "ray-tp-and-dp"],
)  # fmt: skip
def test_consistent_layouts_load(engine: dict[str, Any]) -> None:
    assert spec_of(engine).engine.layout_problem() is None


def test_layout_overrides_go_through_set(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"model: {{path: {MODEL}}}\nengine: {{tensor_parallel_size: 4}}\n")
    assert AgentSpec.from_file(path, ["engine.available_devices=4"]).engine.available_devices == 4
    with pytest.raises(ConfigError) as info:
        AgentSpec.from_file(path, ["engine.available_devices=2"])
    assert str(info.value) == f"{path}: engine: {TP_PP_DP} = 4 x 1 x 1 = 4 GPUs, but available_devices is 2"
    with pytest.raises(ConfigError) as info:
        AgentSpec.from_file(path, ["engine.gpus_per_node=2", "engine.distributed_executor_backend=mp"])
    assert "4 GPUs exceed gpus_per_node 2" in str(info.value)


def test_validate_command_reports_the_layout_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"model: {{path: {MODEL}}}\nengine: {{tensor_parallel_size: 2, pipeline_parallel_size: 2}}\n"
    )
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "engine.available_devices=3"])
    assert result.exit_code == 2
    assert (
        result.output
        == f"Error: {path}: engine: {TP_PP_DP} = 2 x 2 x 1 = 4 GPUs, but available_devices is 3\n"
    )
    ok = CliRunner().invoke(main, ["validate", str(path), "--set", "engine.available_devices=4"])
    assert ok.exit_code == 0, ok.output


# -- what vLLM receives -------------------------------------------------------------------------


def expected(**changes: Any) -> dict[str, Any]:
    """engine_kwargs of a spec with only ``model.path`` and ``changes`` set, on vLLM 0.29."""
    return {
        "model": MODEL, "tokenizer": None, "revision": None, "served_model_name": None,
        "trust_remote_code": False, "dtype": "auto", "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1, "data_parallel_size": 1, "gpu_memory_utilization": 0.9,
        "max_num_seqs": 256, "max_model_len": None, "enforce_eager": False, "seed": 0,
        "distributed_executor_backend": None, "load_format": "auto", "disable_log_stats": True,
        "enable_log_requests": False,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        **changes,
    }  # fmt: skip


LAYOUTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("tp2", {"tensor_parallel_size": 2}, expected(tensor_parallel_size=2)),
    (
        "pp2-mp",
        {"pipeline_parallel_size": 2, "distributed_executor_backend": "mp"},
        expected(pipeline_parallel_size=2, distributed_executor_backend="mp"),
    ),
    (
        "tp2-dp2-mp",
        {"tensor_parallel_size": 2, "data_parallel_size": 2, "distributed_executor_backend": "mp",
         "available_devices": 4},
        expected(tensor_parallel_size=2, data_parallel_size=2, distributed_executor_backend="mp"),
    ),
    (
        "tp2-pp2-ray-2-nodes",
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray",
         "gpus_per_node": 2},
        expected(tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray"),
    ),
    (
        "tp2-pp2-dp2-ray",
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "data_parallel_size": 2,
         "distributed_executor_backend": "ray", "gpus_per_node": 4, "available_devices": 8,
         "extra": {"data_parallel_backend": "ray"}},
        expected(tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2,
                 distributed_executor_backend="ray", data_parallel_backend="ray"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("engine", "kwargs"), [(e, k) for _, e, k in LAYOUTS], ids=[n for n, _, _ in LAYOUTS]
)
def test_engine_kwargs_of_multi_gpu_layouts(engine: dict[str, Any], kwargs: dict[str, Any]) -> None:
    assert engine_kwargs(spec_of(engine)) == kwargs  # gpus_per_node / available_devices stay qwenrun's


@pytest.mark.parametrize(
    ("engine", "kwargs"), [(e, k) for _, e, k in LAYOUTS], ids=[n for n, _, _ in LAYOUTS]
)
def test_async_engine_args_accepts_them(
    engine: dict[str, Any], kwargs: dict[str, Any], tmp_path: Path
) -> None:
    from vllm import AsyncEngineArgs
    from vllm.config import StructuredOutputsConfig

    kwargs = {**kwargs, "model": str(tmp_path)}  # a local directory: the tests run with HF_HUB_OFFLINE
    arguments = engine_kwargs(spec_of(engine, model=str(tmp_path)))
    assert arguments == kwargs
    # as VLLMEngine.start passes it
    arguments["structured_outputs_config"] = StructuredOutputsConfig(**arguments["structured_outputs_config"])
    args = AsyncEngineArgs(**arguments)  # no create_engine_config: that would look for GPUs and Ray
    fields = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    assert "gpus_per_node" not in fields and "available_devices" not in fields
    for name, value in kwargs.items():
        if name != "structured_outputs_config":
            assert getattr(args, name) == value, name
    assert args.structured_outputs_config.backend == "xgrammar"
