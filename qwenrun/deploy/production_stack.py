"""The engine tier: values of the vLLM production-stack Helm chart, built from the agent file.

``qwenrun deploy k8s --engine-tier production-stack`` splits an agent into two tiers: the model
served by vLLM's own chart (github.com/vllm-project/production-stack, chart ``helm/``, named
``vllm-stack``: engine pods running ``vllm serve`` behind its router) and the agent pods of
:mod:`qwenrun.deploy.k8s`, rewritten to ``engine.kind: openai`` with the router's Service as their
base URL. :func:`engine_values` is the chart's values (``servingEngineSpec.modelSpec[0]``,
``routerSpec``) for the file's ``model`` and ``engine`` sections; :func:`agent_engine` the
``engine:`` table of the agent pods. The engine gets the flags the agent's formats need: a tool-call
parser (``--enable-auto-tool-choice --tool-call-parser hermes`` or ``qwen3_coder``) since the
endpoint returns parsed ``tool_calls``, and ``--reasoning-parser qwen3`` when the agent thinks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qwenrun.deploy.options import DeployError, EngineTier, K8sOptions
from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls.formats import AUTO, detect_format

__all__ = [
    "CHART",
    "MAX_RELEASE",
    "agent_engine",
    "check_engine",
    "engine_values",
    "tool_call_format",
]

CHART = "vllm-stack"
"""The chart's name (``helm repo add vllm https://vllm-project.github.io/production-stack``)."""
ROUTER_PORT = 80
"""``routerSpec.servicePort``, written in the values (the chart's default too)."""
MODEL_SPEC_NAME = "llm"
"""``modelSpec[].name``: the chart names the engine pods ``RELEASE-llm-deployment-vllm-…``."""
ENGINE_KEY_ENV = "QWENRUN_ENGINE_API_KEY"
"""The agent pods' variable holding the key the engine requires (``engine.api_key_env``)."""
MAX_RELEASE = 43
"""The longest Helm release: the chart's pod hostname (RELEASE-llm-vllm-stack) and subdomain
(RELEASE-llm-engine-service) are DNS labels of at most 63 characters."""
_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def check_engine(spec: AgentSpec) -> VLLMEngineSpec:
    """The file's vLLM engine, if the chart can run it; else a DeployError saying why."""
    engine = spec.engine
    if not isinstance(engine, VLLMEngineSpec):
        raise DeployError(
            f"{spec.source}: engine.kind: {engine.kind!r}: --engine-tier serves the agent's model with "
            "its engine section, but this agent's model already runs elsewhere (its base_url): deploy "
            "it without --engine-tier"
        )
    tp, pp, dp = engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.data_parallel_size
    ray = engine.distributed_executor_backend == "ray" or engine.extra.get("data_parallel_backend") == "ray"
    if ray or (engine.gpus_per_node is not None and tp * pp * dp > engine.gpus_per_node):
        raise DeployError(
            f"{spec.source}: engine: an engine over several nodes (Ray) is not written for the "
            "production-stack chart (its raySpec): deploy it without --engine-tier (a KubeRay "
            "RayCluster), or with TP x PP x DP within one node"
        )
    if engine.distributed_executor_backend == "external_launcher":
        raise DeployError(
            f"{spec.source}: engine.distributed_executor_backend 'external_launcher' expects torchrun; "
            "`vllm serve` in an engine pod runs 'mp' (leave it unset)"
        )
    return engine


def served_name(spec: AgentSpec) -> str:
    """The model name the engine serves and the router routes by (``--served-model-name``)."""
    return spec.model.served_model_name or spec.model.path


def tool_call_format(spec: AgentSpec) -> tuple[str, str | None]:
    """The engine's ``--tool-call-parser`` for ``model.tool_call_format``, and a warning when
    ``auto`` could not be resolved here (the chat template is read from a local ``model.path``)."""
    requested = spec.model.tool_call_format
    if requested != AUTO:
        return requested, None
    template = _local_chat_template(Path(spec.model.path).expanduser())
    if template is not None:
        return detect_format(template), None
    return "hermes", (
        f"model.tool_call_format auto: the chat template of {spec.model.path!r} is not readable here, so "
        "the engine gets --tool-call-parser hermes; set model.tool_call_format: qwen3_coder for "
        "Qwen3-Coder (and later) models"
    )


def _local_chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = " ".join(str(entry.get("template", "")) for entry in template if isinstance(entry, dict))
    return template if isinstance(template, str) else None


def thinks(spec: AgentSpec) -> bool:
    """Whether the engine needs vLLM's qwen3 reasoning parser: thinking asked for, or a thinking
    budget (vLLM enforces ``thinking_token_budget`` only with a reasoning parser). Unset thinking is
    left to the template: qwenrun then reads ``<think>`` in the text itself."""
    return spec.agent.enable_thinking is True or spec.agent.thinking_budget is not None


def _flag(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + name.replace("_", "-")]
    if isinstance(value, dict):
        return [flag, json.dumps(value, separators=(",", ":"))]
    if isinstance(value, list | tuple):
        return [flag, *(str(item) for item in value)]
    return [flag, str(value)]


def vllm_args(spec: AgentSpec, tool_format: str) -> list[str]:
    """The ``vllm serve`` arguments the chart has no field for (``vllmConfig.extraArgs``)."""
    engine, model = check_engine(spec), spec.model
    args = ["--enable-auto-tool-choice", "--tool-call-parser", tool_format]
    if thinks(spec):
        args += ["--reasoning-parser", "qwen3"]
    if model.served_model_name:
        args += ["--served-model-name", model.served_model_name]
    if model.tokenizer:
        args += ["--tokenizer", model.tokenizer]
    if model.trust_remote_code:
        args.append("--trust-remote-code")
    if engine.pipeline_parallel_size > 1:
        args += ["--pipeline-parallel-size", str(engine.pipeline_parallel_size)]
    if engine.data_parallel_size > 1:
        args += ["--data-parallel-size", str(engine.data_parallel_size)]
    if engine.distributed_executor_backend is not None:
        args += ["--distributed-executor-backend", engine.distributed_executor_backend]
    if engine.enforce_eager:
        args.append("--enforce-eager")
    if engine.seed is not None:
        args += ["--seed", str(engine.seed)]
    if engine.load_format != "auto":
        args += ["--load-format", engine.load_format]
    if "swap_space" in engine.model_fields_set:  # not in every vLLM (0.29 dropped it): only when asked
        args += _flag("swap_space", engine.swap_space)
    if "structured_outputs_config" not in engine.extra:  # as the in-process engine (engine_kwargs)
        config: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": True}
        if thinks(spec):
            config["enable_in_reasoning"] = True
        args += _flag("structured_outputs_config", config)
    # Not --disable-log-stats: the router and the chart's autoscaling read the engine's metrics.
    for name, value in engine.extra.items():
        args += _flag(name, value)
    return args


def _image(tier: EngineTier) -> tuple[str, str]:
    repository, sep, tag = tier.image.rpartition(":")
    if not sep or "/" in tag or "@" in tier.image or not repository:
        raise DeployError(
            f"--engine-image {tier.image!r}: give REPOSITORY:TAG (the chart runs repository:tag; no digests)"
        )
    return repository, tag


def engine_values(
    spec: AgentSpec, release: str, options: K8sOptions, api_key_secret: str | None = None
) -> dict[str, Any]:
    """The production-stack chart's values serving ``spec``'s model with its engine settings; the
    engine requires the key in ``api_key_secret`` (key ``api-key``) when one is named."""
    engine, model = check_engine(spec), spec.model
    tier = options.engine_tier or EngineTier()
    tool_format, _ = tool_call_format(spec)
    repository, tag = _image(tier)
    gpus = str(engine.tensor_parallel_size * engine.pipeline_parallel_size * engine.data_parallel_size)
    vllm_config: dict[str, Any] = {
        "dtype": engine.dtype,
        "tensorParallelSize": engine.tensor_parallel_size,
        "maxNumSeqs": engine.max_num_seqs,
        "gpuMemoryUtilization": engine.gpu_memory_utilization,
        # The chart passes --no-enable-prefix-caching unless this is true; an agent resends its
        # whole conversation every model call, so cached prefixes are most of its prompt.
        "enablePrefixCaching": True,
    }
    if engine.max_model_len is not None:
        vllm_config["maxModelLen"] = engine.max_model_len
    vllm_config["extraArgs"] = vllm_args(spec, tool_format)
    model_spec: dict[str, Any] = {
        "name": MODEL_SPEC_NAME,
        "repository": repository,
        "tag": tag,
        "modelURL": model.path,
        "replicaCount": tier.replicas,
        "resources": {
            "requests": {"cpu": tier.cpu, "memory": tier.memory, "nvidia.com/gpu": gpus},
            "limits": {"memory": tier.memory, "nvidia.com/gpu": gpus},
        },
        "tolerations": [dict(_GPU_TOLERATION)],
        "shmSize": options.shm_size,
        "vllmConfig": vllm_config,
    }
    if model.revision:
        model_spec["modelRevision"] = model.revision
    env = [{"name": key, "value": value} for key, value in engine.env.items()]
    if options.model_volume is not None:
        mount = options.model_mount.rstrip("/") or "/"
        model_spec["extraVolumes"] = [options.model_volume.volume()]
        model_spec["extraVolumeMounts"] = [{"name": "models", "mountPath": options.model_mount}]
        # the chart sets HF_HOME itself (/tmp without its own PVC): the hub cache goes to the volume,
        # where the agent pods of a one-tier deployment keep it too (HF_HOME=/models/huggingface)
        env.append({"name": "HF_HUB_CACHE", "value": f"{mount}/huggingface/hub"})
    if env:
        model_spec["env"] = env
    health = {"path": "/health", "port": 8000}
    serving: dict[str, Any] = {
        # the router finds the engine pods by these labels: unique to this release
        "labels": {"environment": "qwenrun", "release": release},
        "modelSpec": [model_spec],
        "startupProbe": {
            "initialDelaySeconds": 15, "periodSeconds": 10, "httpGet": health,
            "failureThreshold": max(1, math.ceil(options.startup_timeout_s / 10)),
        },
    }  # fmt: skip
    if api_key_secret is not None:  # vLLM's --api-key (VLLM_API_KEY); the router reads it too
        serving["vllmApiKey"] = {"secretName": api_key_secret, "secretKey": "api-key"}
    router = {
        "servicePort": ROUTER_PORT,
        # an agent's next model call repeats the previous prompt: send it to the engine that has it cached
        "routingLogic": "prefixaware",
    }
    return {"servingEngineSpec": serving, "routerSpec": router}


def router_url(release: str) -> str:
    """The base URL of the chart's router: its Service ``RELEASE-router-service`` on ``servicePort``
    (``helm/templates/service-router.yaml``), in the namespace of the release and the agent pods."""
    return f"http://{release}-router-service:{ROUTER_PORT}/v1"


def agent_engine(spec: AgentSpec, release: str, keyed: bool) -> dict[str, Any]:
    """The agent pods' ``engine:`` table: ``kind: openai`` on the router, the served model's name."""
    table: dict[str, Any] = {"kind": "openai", "base_url": router_url(release), "model": served_name(spec)}
    if keyed:
        table["api_key_env"] = ENGINE_KEY_ENV
    return table
