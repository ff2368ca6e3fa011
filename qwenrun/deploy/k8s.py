"""Kubernetes manifests of an agent's OpenAI server, built as plain dicts from the agent file.

One pod per engine (a ``Deployment`` + ``HorizontalPodAutoscaler``) when the engine fits a node:
the pod asks for TP x PP x DP GPUs and vLLM runs every rank in it. When it does not (TP x PP x DP >
``engine.gpus_per_node``, or ``--ray``), a KubeRay ``RayCluster`` instead: the head pod starts Ray
and then ``qwenrun up``, whose vLLM places its workers on the worker pods with its Ray executor.
The agent file travels in a ``ConfigMap``, rewritten to serve ``frontend.kind: openai`` on 0.0.0.0
with the API key read from a Secret that the manifests reference and never contain. Several
replicas (or an autoscaler) need ``sessions.store: postgres``, whose URL comes from a Secret too.
An agent of ``engine.kind: openai`` gets pods without an engine (no GPU). With an engine tier
(:mod:`qwenrun.deploy.production_stack`) the file's engine goes to the chart's values and the pods'
copy of the file is rewritten to ``engine.kind: openai`` on the chart's router.
:mod:`qwenrun.deploy.manifests` builds the objects.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from qwenrun.deploy import production_stack
from qwenrun.deploy.files import dump_yaml
from qwenrun.deploy.manifests import Builder
from qwenrun.deploy.options import (
    DeployError,
    EngineTier,
    K8sOptions,
    K8sPlan,
)
from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.sessions.store import URL_ENV
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.spec.loading import apply_overrides

__all__ = ["plan_k8s"]  # the options and plan types: qwenrun.deploy.options

API_KEY_ENV = "QWENRUN_API_KEY"
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = 40  # room for the suffixes KubeRay and we add (-head-svc, -api-key, pod hashes)


# -- the agent file as the pod runs it --------------------------------------------------------


def _pod_agent(path: str, overrides: Sequence[str], options: K8sOptions) -> tuple[dict[str, Any], list[str]]:
    """The agent file's data with ``overrides`` and the rewrites the pod needs, and those rewrites."""
    data = apply_overrides(yaml.safe_load(Path(path).read_text(encoding="utf-8")), overrides, path)
    changes: list[str] = []
    front: dict[str, Any] = data["frontend"] if isinstance(data.get("frontend"), dict) else {}
    kind = front.get("kind", "cli")
    if kind != "openai":
        front = {"kind": "openai"}
        changes.append(f"frontend.kind=openai (was {kind}: the pod serves the OpenAI API)")
    if front.get("host") != "0.0.0.0":
        front["host"] = "0.0.0.0"
        changes.append("frontend.host=0.0.0.0 (reachable from the Service)")
    if options.api_key and not front.get("api_key_env"):
        front["api_key_env"] = API_KEY_ENV
        changes.append(f"frontend.api_key_env={API_KEY_ENV} (read from the Secret)")
    elif not options.api_key and front.pop("api_key_env", None):
        changes.append("frontend.api_key_env removed (--no-api-key)")
    data["frontend"] = front
    return data, changes


def _to_engine_tier(data: dict[str, Any], original: AgentSpec, release: str, keyed: bool) -> list[str]:
    """Point the pod's agent file at the engine tier's router; the rewrites, as notes."""
    engine = production_stack.agent_engine(original, release, keyed)
    data["engine"] = engine
    changes = [f"engine: kind openai at {engine['base_url']}, model {engine['model']!r} (the engine tier)"]
    tool_format, _ = production_stack.tool_call_format(original)
    if original.model.tool_call_format != tool_format:  # auto: what the engine's parser reads
        data["model"]["tool_call_format"] = tool_format
        changes.append(f"model.tool_call_format={tool_format} (the engine's --tool-call-parser)")
    return changes


def _uses_ray(engine: VLLMEngineSpec) -> bool:
    return engine.distributed_executor_backend == "ray" or engine.extra.get("data_parallel_backend") == "ray"


def _check_name(name: str, flag: str, most: int) -> None:
    if not _NAME.match(name) or len(name) > most:
        raise DeployError(
            f"{flag} {name!r}: a Kubernetes name is lowercase letters, digits and '-', starts with a "
            f"letter and ends with a letter or digit, at most {most} characters here"
        )


def plan_k8s(path: str, overrides: Sequence[str] = (), options: K8sOptions | None = None) -> K8sPlan:
    """The manifests that serve the agent of ``path`` (with ``--set`` ``overrides``) on Kubernetes;
    with ``options.engine_tier`` also the Helm values of the engine tier they connect to."""
    options = options or K8sOptions()
    original = AgentSpec.from_file(path, overrides)  # every file error, reported as `qwenrun up` would
    tier = options.engine_tier
    name = options.name or _k8s_name(original.agent.name)
    _check_name(name, "--name", _MAX_NAME)
    engine = production_stack.check_engine(original) if tier else original.engine
    if tier and options.ray:
        raise DeployError(
            "--ray: with --engine-tier the engine runs in the chart's pods, not in a RayCluster"
        )
    local = isinstance(engine, VLLMEngineSpec) and tier is None  # the pods run vLLM
    if options.ray and not local:
        raise DeployError(
            f"{path}: --ray: engine.kind: openai: the pods run no engine (the model runs at "
            "engine.base_url), so there is nothing to spread over a Ray cluster"
        )
    gpus = per_pod = 0
    ray = False
    data, changes = _pod_agent(path, overrides, options)
    if local:
        assert isinstance(engine, VLLMEngineSpec)
        if engine.distributed_executor_backend == "external_launcher":
            raise DeployError(
                f"{path}: engine.distributed_executor_backend 'external_launcher' expects torchrun to "
                "start one process per GPU, but a pod runs one `qwenrun up`: use 'mp' (one node) or 'ray'"
            )
        tp, pp, dp = engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.data_parallel_size
        gpus, per_pod = tp * pp * dp, engine.gpus_per_node or tp
        ray = options.ray or (engine.gpus_per_node is not None and gpus > engine.gpus_per_node)
        if ray and not _uses_ray(engine):
            if engine.distributed_executor_backend is not None:
                raise DeployError(
                    f"{path}: a Ray cluster needs engine.distributed_executor_backend: ray, not "
                    f"{engine.distributed_executor_backend!r}"
                )
            data.setdefault("engine", {})["distributed_executor_backend"] = "ray"
            changes.append("engine.distributed_executor_backend=ray (the engine spans the Ray cluster)")
        if ray and options.replicas != 1:
            raise DeployError(
                "--replicas: a Ray cluster serves one engine; deploy more under other --name values"
            )
    release = None
    if tier is not None:
        release = tier.release or name
        _check_name(release, "--engine-release", production_stack.MAX_RELEASE)
        changes += _to_engine_tier(data, original, release, options.api_key)
    spec = AgentSpec.from_dict(copy.deepcopy(data), source=path)
    shared = spec.sessions.enabled and spec.sessions.store == "postgres"
    if spec.sessions.enabled and not shared and (options.replicas > 1 or (options.max_replicas or 1) > 1):
        flag = "--replicas" if options.replicas > 1 else "--max-replicas"
        raise DeployError(
            f"{flag}: with sessions.store: sqlite each pod keeps its sessions and stored responses in a "
            "file of its own (a previous_response_id answered by one pod is a 404 on another): set "
            "sessions.store: postgres (and sessions.url: ${QWENRUN_DATABASE_URL}) to run several replicas"
        )
    notes = [f"--set {override}" for override in overrides] + changes
    header = f"# {path} as the pod runs it" + "".join(f"\n#   {note}" for note in notes) + "\n"
    agent_yaml = header + dump_yaml(data)
    plan = K8sPlan(name, spec, agent_yaml, {}, changes, release=release)
    plan.warnings.extend(change for change in changes if change.startswith("frontend.kind="))
    if local or tier is not None:
        plan.warnings.extend(_model_warnings(original, options))
    if shared:
        plan.database_secret = options.database_secret or f"{name}-database"
        plan.database_env = _database_env(data, path)
    if options.api_key:
        plan.api_key_secret = options.api_key_secret or f"{name}-api-key"
    else:
        plan.warnings.append(
            "--no-api-key: the server takes requests without a key: anyone who can reach the Service "
            "can use the model"
        )
    if tier is not None and release is not None:
        _plan_engine_tier(plan, original, release, tier, options)
    Builder(plan, options).build(ray, gpus, per_pod)
    return plan


def _plan_engine_tier(
    plan: K8sPlan, original: AgentSpec, release: str, tier: EngineTier, options: K8sOptions
) -> None:
    assert isinstance(original.engine, VLLMEngineSpec)  # check_engine made sure
    plan.engine_spec = original.engine
    if options.api_key:
        plan.engine_api_key_secret = tier.api_key_secret or f"{plan.name}-engine-api-key"
    else:
        plan.warnings.append("--no-api-key: the engine tier takes requests without a key too")
    plan.engine_values = production_stack.engine_values(
        original, release, options, plan.engine_api_key_secret
    )
    _, warning = production_stack.tool_call_format(original)
    if warning:
        plan.warnings.append(warning)


def _database_env(data: dict[str, Any], path: str) -> str:
    """The variable the pod's ``sessions.url`` names (``${VAR}``); a URL written in the file is
    refused: the ConfigMap would carry its password."""
    sessions = data.get("sessions") if isinstance(data.get("sessions"), dict) else {}
    url = sessions.get("url") if sessions else None
    if url is None:
        return URL_ENV  # the store's default
    found = _ENV_REFERENCE.match(str(url))
    if found is None:
        raise DeployError(
            f"{path}: sessions.url: write sessions.url: ${{{URL_ENV}}}, not the URL itself: the pods "
            "read it from a Secret, and the ConfigMap must not carry the database password"
        )
    return found.group(1)


def _k8s_name(agent_name: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", agent_name.lower()).strip("-")[:_MAX_NAME].rstrip("-")
    return name if name[:1].isalpha() else f"qwenrun-{name}"[:_MAX_NAME].rstrip("-")


def _model_warnings(spec: AgentSpec, options: K8sOptions) -> list[str]:
    path, mount = spec.model.path, options.model_mount.rstrip("/")
    local = path.startswith(("/", ".", "~"))  # else a Hugging Face name, as vLLM reads it
    if local and not path.startswith(f"{mount}/"):
        return [
            f"model.path {path!r} is not under the model volume's mount {mount}: the pod will not find "
            f"it (e.g. --set model.path={mount}/<model directory>)"
        ]
    if options.model_volume is None and local:
        return [f"model.path {path!r} is a local path, but without --model-volume {mount} is empty"]
    if options.model_volume is None:
        return [
            f"no --model-volume: every pod downloads {path!r} from the Hugging Face Hub when it starts "
            "(into an emptyDir)"
        ]
    return []
