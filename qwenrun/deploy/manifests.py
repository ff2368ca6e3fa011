"""The Kubernetes objects of a :class:`~qwenrun.deploy.options.K8sPlan`, as plain dicts.

A ``ConfigMap`` with the agent file, a ``Deployment`` (and ``HorizontalPodAutoscaler``) or a KubeRay
``RayCluster``, and a ``Service``. A pod runs ``qwenrun up``: with the agent's vLLM engine in it
(GPUs, the model volume, ``/dev/shm``) or, for ``engine.kind: openai`` (the agent tier), without one:
CPU and memory only, and with ``--engine-tier`` an init container that waits until the engine
tier's router serves the model (the engine loads for minutes; the agent would exit meanwhile).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from qwenrun.deploy.options import AGENT_PATH, IN_FLIGHT_METRIC, K8sOptions, K8sPlan
from qwenrun.engines.settings import OpenAIEngineSpec, VLLMEngineSpec
from qwenrun.frontends.settings import OpenAIFrontend
from qwenrun.version import __version__

__all__ = ["Builder"]

API_KEY_SECRET_KEY = "api-key"
DATABASE_SECRET_KEY = "url"
AGENT_POD_IN_FLIGHT = 32
"""The autoscaler's default target for an agent pod without an engine (requests in flight per pod)."""
_RAY_HEAD_SCRIPT = (
    "ulimit -n 65536\n"
    '/bin/bash -c "$KUBERAY_GEN_RAY_START_CMD" &\n'
    "until ray status >/dev/null 2>&1; do sleep 2; done\n"
    f"exec qwenrun up {AGENT_PATH}\n"
)
_WAIT_FOR_ENGINE = """\
import json, os, sys, time, urllib.request
url, model, budget = sys.argv[1].rstrip("/") + "/models", sys.argv[2], float(sys.argv[3])
key = os.environ.get(sys.argv[4]) if len(sys.argv) > 4 else None
request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
deadline = time.monotonic() + budget
while True:
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            served = [entry.get("id") for entry in json.load(answer).get("data", [])]
        if model in served:
            print(f"{url} serves {model}")
            sys.exit(0)
        print(f"{url} serves {served}, not yet {model}", flush=True)
    except Exception as exc:
        print(f"{url}: {exc}", flush=True)
    if time.monotonic() > deadline:
        sys.exit(f"{url} did not serve {model} within {budget:g} s")
    time.sleep(5)
"""


class Builder:
    """The Kubernetes objects of a plan, into ``plan.manifests``."""

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
        self.local_engine = isinstance(plan.spec.engine, VLLMEngineSpec)  # vLLM runs in the pod

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
        deployment: dict[str, Any] = {
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
        if self.plan.release is not None:  # the engine tier loads for minutes: wait for it, not crash-loop
            pod = deployment["spec"]["template"]["spec"]
            pod["initContainers"] = [self.wait_for_engine()]
        return deployment

    def wait_for_engine(self) -> dict[str, Any]:
        engine = self.plan.spec.engine
        assert isinstance(engine, OpenAIEngineSpec)  # the agent tier's
        model = engine.model or self.plan.spec.model.path
        budget = str(self.options.startup_timeout_s)
        env = [entry for entry in self.env() if entry["name"] == engine.api_key_env]  # the engine's key only
        return {
            "name": "wait-for-engine", "image": self.options.image, "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "-c", _WAIT_FOR_ENGINE, engine.base_url, model, budget,
                        *([engine.api_key_env] if engine.api_key_env else [])],
            "env": env,
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        }  # fmt: skip

    def autoscaler(self) -> dict[str, Any]:
        options, engine = self.options, self.plan.spec.engine
        if isinstance(engine, VLLMEngineSpec):
            target = options.target_in_flight or max(1, engine.max_num_seqs * engine.data_parallel_size // 2)
        else:  # an agent pod without an engine: its load is the agent loop's, the model's is elsewhere
            target = options.target_in_flight or AGENT_POD_IN_FLIGHT
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
                # A GPU pod takes minutes to load the model: add one at a time, remove slowly (an
                # agent pod starts in seconds, but its requests are conversations of minutes).
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
        pod: dict[str, Any] = {
            "terminationGracePeriodSeconds": self.options.grace_period_s if grace_s is None else grace_s,
            "securityContext": {"fsGroup": 1000},  # the image runs as uid 1000; volumes writable to it
            "containers": containers,
            "volumes": [{"name": "agent", "configMap": {"name": self.name}}],
        }
        if self.local_engine:
            pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            pod["volumes"] += [
                model.volume() if model else {"name": "models", "emptyDir": {}},
                # NCCL and vLLM's worker queues use shared memory; Docker's default 64 MiB is too small.
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.options.shm_size}},
            ]
        return pod

    def server(self, gpus: int, command: list[str], args: list[str] | None = None) -> dict[str, Any]:
        options = self.options
        health = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
        env = self.env()
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

    def env(self) -> list[dict[str, Any]]:
        plan, engine = self.plan, self.plan.spec.engine
        env: list[dict[str, Any]] = [self.hf_home_env()] if self.local_engine else []
        secrets = [(self.frontend.api_key_env, plan.api_key_secret, API_KEY_SECRET_KEY),
                   (plan.database_env, plan.database_secret, DATABASE_SECRET_KEY)]  # fmt: skip
        if isinstance(engine, OpenAIEngineSpec):
            secrets.append((engine.api_key_env, plan.engine_api_key_secret, API_KEY_SECRET_KEY))
        for variable, secret, key in secrets:
            if variable and secret:
                env.append({"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        return env

    def hf_home_env(self) -> dict[str, str]:
        return {"name": "HF_HOME", "value": f"{self.options.model_mount.rstrip('/')}/huggingface"}

    def mounts(self) -> list[dict[str, Any]]:
        agent = {"name": "agent", "mountPath": str(Path(AGENT_PATH).parent), "readOnly": True}
        if not self.local_engine:
            return [agent]
        return [
            agent,
            {"name": "models", "mountPath": self.options.model_mount},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ]

    def resources(self, gpus: int) -> dict[str, Any]:
        options = self.options
        if not self.local_engine:  # no GPU: the agent loop, its tools and the HTTP server
            cpu, memory = options.cpu or "1", options.memory or "2Gi"
            return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
        cpu, memory = options.cpu or "4", options.memory or "32Gi"
        return {
            "requests": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)},
            "limits": {"memory": memory, "nvidia.com/gpu": str(gpus)},
        }


_POD_IP_ENV = {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
