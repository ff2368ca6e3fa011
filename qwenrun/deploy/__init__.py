"""Deployment files for an agent: Kubernetes manifests of its OpenAI-compatible server.

qwenrun adds no distribution of its own: a pod runs ``qwenrun up`` on the agent file, vLLM spreads
the engine over the pod's GPUs (``tensor/pipeline/data_parallel_size``) or over a Ray cluster that
KubeRay runs (``distributed_executor_backend: ray``), and Kubernetes does replicas, probes and
autoscaling. With ``--engine-tier production-stack`` the model runs apart, in the engine pods of
vLLM's production-stack Helm chart (:mod:`qwenrun.deploy.production_stack` writes its values), and
the agent pods reach it through the chart's router (``engine.kind: openai``). :func:`plan_k8s`
builds the manifests as Python dicts, :func:`write_manifests` writes them as YAML.
``qwenrun deploy k8s`` (:mod:`qwenrun.cli.deploy`) is the command line.
"""

from __future__ import annotations

from qwenrun.deploy.files import render_all, write_manifests
from qwenrun.deploy.k8s import plan_k8s
from qwenrun.deploy.options import (
    AGENT_PATH,
    IN_FLIGHT_METRIC,
    DeployError,
    EngineTier,
    K8sOptions,
    K8sPlan,
    ModelVolume,
)

__all__ = [
    "AGENT_PATH",
    "IN_FLIGHT_METRIC",
    "DeployError",
    "EngineTier",
    "K8sOptions",
    "K8sPlan",
    "ModelVolume",
    "plan_k8s",
    "render_all",
    "write_manifests",
]
