"""What ``qwenrun deploy k8s`` takes besides the agent file, what it gives back, and its error.

:class:`K8sOptions` holds the pods' settings, :class:`EngineTier` those of the engine tier
(``--engine-tier production-stack``: the model served by the vLLM production-stack chart, the agent
pods in front of its router), :class:`ModelVolume` where the weights are; :class:`K8sPlan` is the
result (manifests by file name, the chart's values, the Secrets to create, warnings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.errors import QwenrunError
from qwenrun.sessions.store import URL_ENV
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.version import __version__

__all__ = [
    "AGENT_PATH",
    "DEFAULT_ENGINE_IMAGE",
    "DEFAULT_IMAGE",
    "IN_FLIGHT_METRIC",
    "DeployError",
    "EngineTier",
    "K8sOptions",
    "K8sPlan",
    "ModelVolume",
]

DEFAULT_IMAGE = f"qwenrun-server:{__version__}"
AGENT_PATH = "/etc/qwenrun/agent.yaml"
IN_FLIGHT_METRIC = "qwenrun_requests_in_flight"
"""The gauge of :mod:`qwenrun.frontends.openai.metrics` the autoscaler follows (through a metrics adapter)."""

DEFAULT_ENGINE_IMAGE = "vllm/vllm-openai:v0.26.0"
"""The engine tier's image: vLLM's own server image, of the vLLM version the Dockerfile installs."""


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
    cpu: str | None = None  # None: 4 for a pod with an engine, 1 for an agent pod without one
    memory: str | None = None  # None: 32Gi with an engine, 2Gi without
    shm_size: str = "16Gi"
    startup_timeout_s: int = 1800
    grace_period_s: int = 120
    engine_tier: EngineTier | None = None  # the engine in its own tier (``--engine-tier``)


@dataclass(frozen=True, slots=True)
class EngineTier:
    """``--engine-tier production-stack``: the engine's settings that are not in the agent file."""

    kind: Literal["production-stack"] = "production-stack"
    release: str | None = None  # the Helm release (default: the agent objects' name)
    replicas: int = 1  # engine pods behind the router (the chart's replicaCount)
    image: str = DEFAULT_ENGINE_IMAGE  # REPOSITORY:TAG of a ``vllm serve`` image
    cpu: str = "4"
    memory: str = "32Gi"
    api_key_secret: str | None = None  # Secret with key 'api-key' the engine requires (NAME-engine-api-key)


@dataclass(slots=True)
class K8sPlan:
    """What ``qwenrun deploy k8s`` writes: manifests by file name, and what to tell the user."""

    name: str
    spec: AgentSpec  # the agent file as the pods run it
    agent_yaml: str
    manifests: dict[str, dict[str, Any]]
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    api_key_secret: str | None = None
    database_secret: str | None = None  # the Secret whose key 'url' the pods read (sessions.store: postgres)
    database_env: str = URL_ENV
    release: str | None = None  # the engine tier's Helm release (--engine-tier)
    engine_values: dict[str, Any] | None = None  # the chart's values (--engine-tier)
    engine_api_key_secret: str | None = None  # the Secret with key 'api-key' the engine tier requires
    engine_spec: VLLMEngineSpec | None = None  # the engine tier's settings (from the file as written)

    @property
    def ray(self) -> bool:
        return "raycluster.yaml" in self.manifests

    @property
    def engine(self) -> VLLMEngineSpec | None:
        """The vLLM engine of the deployment: in the pods, or in the engine tier; None for agent
        pods of ``engine.kind: openai`` whose model runs elsewhere."""
        if self.engine_spec is not None:
            return self.engine_spec
        return self.spec.engine if isinstance(self.spec.engine, VLLMEngineSpec) else None
