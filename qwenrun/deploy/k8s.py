"""Kubernetes manifests of an agent's OpenAI server, built as plain dicts from the agent file.

One pod per engine (a ``Deployment`` + ``HorizontalPodAutoscaler``) when the engine fits a node:
the pod asks for TP x PP x DP GPUs and vLLM runs every rank in it. When it does not (TP x PP x DP >
``engine.gpus_per_node``, or ``--ray``), a KubeRay ``RayCluster`` instead: the head pod starts Ray
and then ``qwenrun up``, whose vLLM places its workers on the worker pods with its Ray executor.
The agent file travels in a ``ConfigMap``, rewritten to serve ``frontend.kind: openai`` on 0.0.0.0
with the API key read from a Secret that the manifests reference and never contain. Several
replicas (or an autoscaler) need ``sessions.store: postgres``, whose URL comes from a Secret too.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qwenrun.deploy.files import dump_yaml
from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.errors import QwenrunError
from qwenrun.frontends.settings import OpenAIFrontend
from qwenrun.sessions.store import URL_ENV
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.spec.loading import apply_overrides
from qwenrun.version import __version__

__all__ = [
    "AGENT_PATH",
    "DEFAULT_IMAGE",
    "IN_FLIGHT_METRIC",
    "DeployError",
    "K8sOptions",
    "K8sPlan",
    "ModelVolume",
    "plan_k8s",
]

DEFAULT_IMAGE = f"qwenrun-server:{__version__}"
AGENT_PATH = "/etc/qwenrun/agent.yaml"
IN_FLIGHT_METRIC = "qwenrun_requests_in_flight"
"""The gauge of :mod:`qwenrun.frontends.openai.metrics` the autoscaler follows (through a metrics adapter)."""
API_KEY_ENV = "QWENRUN_API_KEY"
API_KEY_SECRET_KEY = "api-key"
DATABASE_SECRET_KEY = "url"
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = 40  # room for the suffixes KubeRay and we add (-head-svc, -api-key, pod hashes)
_RAY_HEAD_SCRIPT = (
    "ulimit -n 65536\n"
    '/bin/bash -c "$KUBERAY_GEN_RAY_START_CMD" &\n'
    "until ray status >/dev/null 2>&1; do sleep 2; done\n"
    f"exec qwenrun up {AGENT_PATH}\n"
)


class DeployError(QwenrunError):
    """The agent cannot be deployed the way it was asked (the message says why and what to do)."""


@dataclass(frozen=True, slots=True)
class ModelVolume:
    """Where the pods find the weights: a PersistentVolumeClaim or a directory of the node."""

    kind: Literal["pvc", "hostpath"]
    source: str

    @classmethod
    def parse(cls, text: str) -> ModelVolume:
        """``pvc:CLAIM`` or ``hostpath:/DIR`` (the prefix in any case)."""
        kind, sep, source = text.partition(":")
        kind = kind.strip().lower()
        if not sep or not source.strip() or kind not in ("pvc", "hostpath"):
            raise ValueError(f"{text!r}: expected pvc:CLAIM or hostpath:/DIR")
        if kind == "hostpath" and not source.startswith("/"):
            raise ValueError(f"{text!r}: the hostPath must be absolute")
        if kind == "pvc" and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", source):
            raise ValueError(f"{text!r}: {source!r} is not a valid PersistentVolumeClaim name")
        return cls("pvc" if kind == "pvc" else "hostpath", source)

    def volume(self) -> dict[str, Any]:
        if self.kind == "pvc":
            return {"name": "models", "persistentVolumeClaim": {"claimName": self.source}}
        return {"name": "models", "hostPath": {"path": self.source, "type": "Directory"}}


@dataclass(frozen=True, slots=True)
class K8sOptions:
    """The settings of ``qwenrun deploy k8s`` that are not in the agent file."""

    image: str = DEFAULT_IMAGE
    name: str | None = None
    namespace: str | None = None
    replicas: int = 1
    max_replicas: int | None = None
    target_in_flight: int | None = None
    model_volume: ModelVolume | None = None
    model_mount: str = "/models"
    api_key: bool = True
    api_key_secret: str | None = None
    database_secret: str | None = None
    ray: bool = False
    cpu: str = "4"
    memory: str = "32Gi"
    shm_size: str = "16Gi"
    startup_timeout_s: int = 1800
    grace_period_s: int = 120


@dataclass(slots=True)
class K8sPlan:
    """What ``qwenrun deploy k8s`` writes: manifests by file name, and what to tell the user."""

    name: str
    spec: AgentSpec
    agent_yaml: str
    manifests: dict[str, dict[str, Any]]
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    api_key_secret: str | None = None
    database_secret: str | None = None  # the Secret whose key 'url' the pods read (sessions.store: postgres)
    database_env: str = URL_ENV

    @property
    def ray(self) -> bool:
        return "raycluster.yaml" in self.manifests

    @property
    def engine(self) -> VLLMEngineSpec:
        return _vllm(self.spec)


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


def _vllm(spec: AgentSpec) -> VLLMEngineSpec:
    if not isinstance(spec.engine, VLLMEngineSpec):
        raise DeployError(
            f"{spec.source}: engine.kind: {spec.engine.kind!r}: `qwenrun deploy k8s` deploys an agent "
            "with its vLLM engine (engine.kind vllm); this agent's model runs elsewhere"
        )
    return spec.engine


def _uses_ray(spec: AgentSpec) -> bool:
    engine = _vllm(spec)
    return engine.distributed_executor_backend == "ray" or engine.extra.get("data_parallel_backend") == "ray"


def plan_k8s(path: str, overrides: Sequence[str] = (), options: K8sOptions | None = None) -> K8sPlan:
    """The manifests that serve the agent of ``path`` (with ``--set`` ``overrides``) on Kubernetes."""
    options = options or K8sOptions()
    original = AgentSpec.from_file(path, overrides)  # every file error, reported as `qwenrun up` would
    engine = _vllm(original)
    if engine.distributed_executor_backend == "external_launcher":
        raise DeployError(
            f"{path}: engine.distributed_executor_backend 'external_launcher' expects torchrun to start "
            "one process per GPU, but a pod runs one `qwenrun up`: use 'mp' (one node) or 'ray'"
        )
    tp, pp, dp = engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.data_parallel_size
    per_node = engine.gpus_per_node
    ray = options.ray or (per_node is not None and tp * pp * dp > per_node)
    data, changes = _pod_agent(path, overrides, options)
    if ray and not _uses_ray(original):
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
    spec = AgentSpec.from_dict(copy.deepcopy(data), source=path)
    shared = spec.sessions.enabled and spec.sessions.store == "postgres"
    if spec.sessions.enabled and not shared and (options.replicas > 1 or (options.max_replicas or 1) > 1):
        flag = "--replicas" if options.replicas > 1 else "--max-replicas"
        raise DeployError(
            f"{flag}: with sessions.store: sqlite each pod keeps its sessions and stored responses in a "
            "file of its own (a previous_response_id answered by one pod is a 404 on another): set "
            "sessions.store: postgres (and sessions.url: ${QWENRUN_DATABASE_URL}) to run several replicas"
        )
    name = options.name or _k8s_name(spec.agent.name)
    if not _NAME.match(name) or len(name) > _MAX_NAME:
        raise DeployError(
            f"--name {name!r}: a Kubernetes name is lowercase letters, digits and '-', starts with a "
            f"letter and ends with a letter or digit, at most {_MAX_NAME} characters here"
        )
    notes = [f"--set {override}" for override in overrides] + changes
    header = f"# {path} as the pod runs it" + "".join(f"\n#   {note}" for note in notes) + "\n"
    agent_yaml = header + dump_yaml(data)
    plan = K8sPlan(name, spec, agent_yaml, {}, changes)
    plan.warnings.extend(change for change in changes if change.startswith("frontend.kind="))
    plan.warnings.extend(_model_warnings(spec, options))
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
    _Builder(plan, options).build(ray, tp * pp * dp, per_node or tp)
    return plan


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


# -- the manifests ----------------------------------------------------------------------------


class _Builder:
    def __init__(self, plan: K8sPlan, options: K8sOptions) -> None:
        self.plan, self.options, self.name = plan, options, plan.name
        front = plan.spec.frontend
        assert isinstance(front, OpenAIFrontend)  # _pod_agent made it so
        self.frontend, self.port = front, front.port
        self.selector = {"app.kubernetes.io/name": "qwenrun", "app.kubernetes.io/instance": self.name}
        self.labels = {**self.selector, "app.kubernetes.io/version": __version__,
                       "app.kubernetes.io/managed-by": "qwenrun-deploy"}  # fmt: skip
        digest = hashlib.sha256(plan.agent_yaml.encode()).hexdigest()
        self.pod_annotations = {"qwenrun/agent-sha256": digest}  # a changed file rolls the pods

    def build(self, ray: bool, gpus: int, gpus_per_pod: int) -> None:
        manifests = self.plan.manifests
        manifests["configmap.yaml"] = {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": self.metadata(),
            "data": {"agent.yaml": self.plan.agent_yaml},
        }  # fmt: skip
        if ray:
            manifests["raycluster.yaml"] = self.ray_cluster(gpus, gpus_per_pod)
            selector = {"ray.io/cluster": self.name, "ray.io/node-type": "head"}
        else:
            manifests["deployment.yaml"] = self.deployment(gpus)
            if self.plan.database_secret or not self.plan.spec.sessions.enabled:  # pods that share state
                manifests["hpa.yaml"] = self.autoscaler()
            selector = self.selector
        manifests["service.yaml"] = {
            "apiVersion": "v1", "kind": "Service", "metadata": self.metadata(),
            "spec": {
                "type": "ClusterIP", "selector": selector,
                "ports": [{"name": "http", "port": self.port, "targetPort": "http", "protocol": "TCP"}],
            },
        }  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "labels": dict(self.labels)}
        if self.options.namespace:
            meta["namespace"] = self.options.namespace
        return meta

    def deployment(self, gpus: int) -> dict[str, Any]:
        options = self.options
        return {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": self.metadata(),
            "spec": {
                "replicas": options.replicas,
                "selector": {"matchLabels": dict(self.selector)},
                # A new pod must be ready before an old one goes: GPU capacity never drops.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "progressDeadlineSeconds": options.startup_timeout_s + 600,
                "template": self.template(self.pod([self.server(gpus, ["qwenrun", "up", AGENT_PATH])])),
            },
        }  # fmt: skip

    def autoscaler(self) -> dict[str, Any]:
        options, engine = self.options, self.plan.engine
        target = options.target_in_flight or max(1, engine.max_num_seqs * engine.data_parallel_size // 2)
        return {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": self.metadata(),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": self.name},
                "minReplicas": options.replicas,
                "maxReplicas": max(options.max_replicas or 2 * options.replicas, options.replicas),
                "metrics": [{"type": "Pods", "pods": {
                    "metric": {"name": IN_FLIGHT_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(target)},
                }}],
                # A GPU pod takes minutes to load the model: add one at a time, remove slowly.
                "behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": 60,
                                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
                    "scaleDown": {"stabilizationWindowSeconds": 900,
                                  "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}]},
                },
            },
        }  # fmt: skip

    def ray_cluster(self, gpus: int, gpus_per_pod: int) -> dict[str, Any]:
        pods = math.ceil(gpus / gpus_per_pod)
        head = self.server(gpus_per_pod, ["/bin/bash", "-c", "--"], args=[_RAY_HEAD_SCRIPT])
        head["env"].append(_POD_IP_ENV)
        annotations = {"ray.io/overwrite-container-cmd": "true"}  # KubeRay: run our command, not its own
        spec: dict[str, Any] = {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": self.template(self.pod([head], self.options.grace_period_s), annotations),
            },
        }
        if pods > 1:
            worker = {
                "name": "ray-worker", "image": self.options.image, "imagePullPolicy": "IfNotPresent",
                "env": [self.hf_home_env(), _POD_IP_ENV], "resources": self.resources(gpus_per_pod),
                "volumeMounts": self.mounts()[1:],
            }  # fmt: skip
            spec["workerGroupSpecs"] = [{
                "groupName": "gpu", "replicas": pods - 1, "minReplicas": pods - 1, "maxReplicas": pods - 1,
                "rayStartParams": {}, "template": self.template(self.pod([worker], 30)),
            }]  # fmt: skip
        return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": self.metadata(), "spec": spec}

    def template(self, pod: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
        metadata = {
            "labels": dict(self.labels),
            "annotations": {**self.pod_annotations, **(annotations or {})},
        }
        return {"metadata": metadata, "spec": pod}

    def pod(self, containers: list[dict[str, Any]], grace_s: int | None = None) -> dict[str, Any]:
        model = self.options.model_volume
        return {
            "terminationGracePeriodSeconds": self.options.grace_period_s if grace_s is None else grace_s,
            "securityContext": {"fsGroup": 1000},  # the image runs as uid 1000; volumes writable to it
            "containers": containers,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "volumes": [
                {"name": "agent", "configMap": {"name": self.name}},
                model.volume() if model else {"name": "models", "emptyDir": {}},
                # NCCL and vLLM's worker queues use shared memory; Docker's default 64 MiB is too small.
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.options.shm_size}},
            ],
        }

    def server(self, gpus: int, command: list[str], args: list[str] | None = None) -> dict[str, Any]:
        options = self.options
        health = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
        env: list[dict[str, Any]] = [self.hf_home_env()]
        if self.plan.api_key_secret and self.frontend.api_key_env:
            env.append({"name": self.frontend.api_key_env, "valueFrom": {"secretKeyRef": {
                "name": self.plan.api_key_secret, "key": API_KEY_SECRET_KEY}}})  # fmt: skip
        if self.plan.database_secret:
            env.append({"name": self.plan.database_env, "valueFrom": {"secretKeyRef": {
                "name": self.plan.database_secret, "key": DATABASE_SECRET_KEY}}})  # fmt: skip
        container: dict[str, Any] = {
            "name": "qwenrun", "image": options.image, "imagePullPolicy": "IfNotPresent",
            "command": command, **({"args": args} if args else {}),
            "ports": [{"name": "http", "containerPort": self.port, "protocol": "TCP"}],
            "env": env, "resources": self.resources(gpus), "volumeMounts": self.mounts(),
            # /health is 503 until the engine has loaded, and again if it dies.
            "startupProbe": {**health, "periodSeconds": 10,
                             "failureThreshold": max(1, math.ceil(options.startup_timeout_s / 10))},
            "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 2},
            "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 4},
            # Let the endpoints drop the pod before SIGTERM; uvicorn then finishes running requests.
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", "10"]}}},
        }  # fmt: skip
        return container

    def hf_home_env(self) -> dict[str, str]:
        return {"name": "HF_HOME", "value": f"{self.options.model_mount.rstrip('/')}/huggingface"}

    def mounts(self) -> list[dict[str, Any]]:
        return [
            {"name": "agent", "mountPath": str(Path(AGENT_PATH).parent), "readOnly": True},
            {"name": "models", "mountPath": self.options.model_mount},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ]

    def resources(self, gpus: int) -> dict[str, Any]:
        options = self.options
        return {
            "requests": {"cpu": options.cpu, "memory": options.memory, "nvidia.com/gpu": str(gpus)},
            "limits": {"memory": options.memory, "nvidia.com/gpu": str(gpus)},
        }


_POD_IP_ENV = {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
