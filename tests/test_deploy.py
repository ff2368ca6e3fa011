"""``qwenrun deploy k8s``: manifests validated against the Kubernetes API schemas (strict JSON
schemas shipped offline by ``kubernetes-validate``), their wiring (selectors, ports, probes, GPUs,
Secret, ConfigMap), the KubeRay variant, and the command line (files, exit codes, messages)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from qwenrun.cli import main
from qwenrun.deploy import (
    AGENT_PATH,
    IN_FLIGHT_METRIC,
    DeployError,
    EngineTier,
    K8sOptions,
    K8sPlan,
    ModelVolume,
    plan_k8s,
    render_all,
    write_manifests,
)
from qwenrun.deploy.files import GENERATED
from qwenrun.engines.settings import OpenAIEngineSpec
from qwenrun.errors import ConfigError
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent
AGENTS = sorted((ROOT / "agents").glob("*.yaml"))
K8S_VERSIONS = ("1.29", "1.37")  # the oldest and newest API schemas kubernetes-validate ships here

# The RayCluster fields qwenrun writes, as KubeRay's ray.io/v1 API declares them (required ones
# included); the pod templates inside are checked against the Kubernetes PodTemplateSpec schema.
_GROUP_COMMON = {"rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                 "template": {"type": "object"}}  # fmt: skip
RAY_CLUSTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "headGroupSpec": {
                    "type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
                    "properties": {**_GROUP_COMMON, "serviceType": {"type": "string"}},
                },
                "workerGroupSpecs": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                    "properties": {
                        **_GROUP_COMMON, "groupName": {"type": "string", "minLength": 1},
                        **{key: {"type": "integer", "minimum": 0}
                           for key in ("replicas", "minReplicas", "maxReplicas")},
                    },
                }},
            },
        },
    },
}  # fmt: skip


def validate(manifest: dict[str, Any]) -> None:
    """Raise unless ``manifest`` is valid for every Kubernetes version in ``K8S_VERSIONS``."""
    if manifest["kind"] == "RayCluster":
        jsonschema.validate(manifest, RAY_CLUSTER_SCHEMA)
        spec = manifest["spec"]
        templates = [spec["headGroupSpec"]["template"]] + [
            g["template"] for g in spec.get("workerGroupSpecs", [])
        ]
        for template in templates:
            validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            )
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def write_agent(tmp_path: Path, text: str, name: str = "agent.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


AGENT = """\
model: {path: /models/Qwen2.5-7B-Instruct, served_model_name: qwen}
engine: {tensor_parallel_size: 2, max_num_seqs: 64}
agent: {name: Weather_Bot.v2}
frontend: {kind: chainlit, title: Weather, port: 9000}
"""


POSTGRES = "sessions.store=postgres"  # replicas share their sessions: an autoscaler is allowed


def plan_of(tmp_path: Path, text: str = AGENT, overrides: tuple[str, ...] = (), **options: Any) -> K8sPlan:
    return plan_k8s(write_agent(tmp_path, text), overrides, K8sOptions(**options))


def container_of(manifest: dict[str, Any]) -> dict[str, Any]:
    if manifest["kind"] == "RayCluster":
        return dict(manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    return dict(manifest["spec"]["template"]["spec"]["containers"][0])


# -- schema validity ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", AGENTS, ids=[p.name for p in AGENTS])
def test_every_shipped_agent_deploys_to_valid_manifests(path: Path) -> None:
    plan = plan_k8s(
        str(path), ["model.path=/models/qwen"], K8sOptions(model_volume=ModelVolume("pvc", "models"))
    )
    assert set(plan.manifests) == {"configmap.yaml", "deployment.yaml", "service.yaml"}  # SQLite: one pod
    for manifest in plan.manifests.values():
        validate(manifest)


def test_ray_cluster_manifests_are_valid(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, overrides=("engine.pipeline_parallel_size=2",), ray=True)
    assert set(plan.manifests) == {"configmap.yaml", "raycluster.yaml", "service.yaml"}
    for manifest in plan.manifests.values():
        validate(manifest)


def test_the_validators_reject_broken_manifests(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, overrides=("engine.pipeline_parallel_size=2",), ray=True)
    deployment = plan_of(tmp_path).manifests["deployment.yaml"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError, match="'prot' was unexpected"):
        validate(broken)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError, match="is not of type 'integer'"):
        validate(broken)
    cluster = copy.deepcopy(plan.manifests["raycluster.yaml"])
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="'groupName' is a required property"):
        validate(cluster)
    cluster = copy.deepcopy(plan.manifests["raycluster.yaml"])
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = (
        "http"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(cluster)


# -- what the Deployment does --------------------------------------------------------------------


def test_deployment_runs_the_agent_with_its_gpus_probes_and_graceful_stop(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, overrides=("engine.data_parallel_size=2", POSTGRES), image="reg.example/qwenrun:1",
                   replicas=2, grace_period_s=300, startup_timeout_s=3600, shm_size="8Gi")  # fmt: skip
    deployment = plan.manifests["deployment.yaml"]
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert container["image"] == "reg.example/qwenrun:1"
    assert container["command"] == ["qwenrun", "up", AGENT_PATH]
    # TP 2 x PP 1 x DP 2: vLLM runs every data-parallel rank in the pod
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert container["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    ]  # chainlit's 9000 is not kept
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert deployment["spec"]["progressDeadlineSeconds"] > 3600
    assert pod["terminationGracePeriodSeconds"] == 300
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "10"]}}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts == {"agent": "/etc/qwenrun", "models": "/models", "dshm": "/dev/shm"}
    assert f"{mounts['agent']}/agent.yaml" == AGENT_PATH
    assert volumes["agent"]["configMap"]["name"] == plan.name


@pytest.mark.parametrize(
    ("volume", "expected"),
    [
        ("pvc:qwen-weights", {"persistentVolumeClaim": {"claimName": "qwen-weights"}}),
        ("HostPath:/srv/models", {"hostPath": {"path": "/srv/models", "type": "Directory"}}),
        (None, {"emptyDir": {}}),
    ],
)
def test_model_volume(tmp_path: Path, volume: str | None, expected: dict[str, Any]) -> None:
    plan = plan_of(tmp_path, model_volume=ModelVolume.parse(volume) if volume else None)
    pod = plan.manifests["deployment.yaml"]["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "models") == {"name": "models", **expected}
    assert {"name": "HF_HOME", "value": "/models/huggingface"} in pod["containers"][0]["env"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models", "'models': expected pvc:CLAIM or hostpath:/DIR"),
        ("nfs:/x", "'nfs:/x': expected pvc:CLAIM or hostpath:/DIR"),
        ("hostpath:models", "'hostpath:models': the hostPath must be absolute"),
        ("pvc:Bad_Name", "'pvc:Bad_Name': 'Bad_Name' is not a valid PersistentVolumeClaim name"),
    ],
)
def test_bad_model_volumes(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ModelVolume.parse(text)
    assert str(info.value) == message


def test_configmap_holds_the_agent_switched_to_openai_on_all_interfaces(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, overrides=("sampling.temperature=0.1",), model_volume=ModelVolume("pvc", "m"))
    text = plan.manifests["configmap.yaml"]["data"]["agent.yaml"]
    assert text == plan.agent_yaml
    served = AgentSpec.from_text(text, source="pod")
    assert served.frontend.kind == "openai"
    assert (served.frontend.host, served.frontend.port, served.frontend.api_key_env) == (
        "0.0.0.0",
        8000,
        "QWENRUN_API_KEY",
    )
    assert served.sampling.temperature == 0.1
    assert served.engine.tensor_parallel_size == 2
    assert text.splitlines()[1:6] == [
        "#   --set sampling.temperature=0.1",
        "#   frontend.kind=openai (was chainlit: the pod serves the OpenAI API)",
        "#   frontend.host=0.0.0.0 (reachable from the Service)",
        "#   frontend.api_key_env=QWENRUN_API_KEY (read from the Secret)",
        "model:",
    ]
    assert plan.warnings == ["frontend.kind=openai (was chainlit: the pod serves the OpenAI API)"]
    annotations = plan.manifests["deployment.yaml"]["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["qwenrun/agent-sha256"]) == 64  # a new file rolls the pods


def test_an_openai_agent_keeps_its_port_and_key_variable(tmp_path: Path) -> None:
    text = "model: {path: /models/q}\nagent: {name: calc}\nfrontend: {kind: openai, port: 8080, api_key_env: CALC_KEY}\n"
    plan = plan_of(tmp_path, text, api_key_secret="calc-secret")
    container = container_of(plan.manifests["deployment.yaml"])
    assert {
        "name": "CALC_KEY",
        "valueFrom": {"secretKeyRef": {"name": "calc-secret", "key": "api-key"}},
    } in container["env"]
    assert container["ports"][0]["containerPort"] == 8080
    assert plan.manifests["service.yaml"]["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert plan.changes == ["frontend.host=0.0.0.0 (reachable from the Service)"]
    assert "kind: Secret" not in render_all(plan.manifests)  # referenced, never created


def test_no_api_key_is_warned_and_removes_the_variable(tmp_path: Path) -> None:
    text = "model: {path: /models/q}\nfrontend: {kind: openai, api_key_env: KEY}\n"
    plan = plan_of(tmp_path, text, api_key=False, model_volume=ModelVolume("pvc", "m"))
    assert plan.api_key_secret is None
    assert AgentSpec.from_text(plan.agent_yaml).frontend.api_key_env is None  # type: ignore[union-attr]
    assert all(
        "secretKeyRef" not in str(env) for env in container_of(plan.manifests["deployment.yaml"])["env"]
    )
    assert plan.warnings == [
        "--no-api-key: the server takes requests without a key: anyone who can reach the Service can use the model"
    ]


def test_service_and_autoscaler_target_the_deployment(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, overrides=(POSTGRES,), replicas=2, max_replicas=6, namespace="llm")
    deployment, service, hpa = (plan.manifests[f] for f in ("deployment.yaml", "service.yaml", "hpa.yaml"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == container_of(deployment)["ports"][0]["name"]
    assert {m["metadata"].get("namespace") for m in plan.manifests.values()} == {"llm"}
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan.name}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "qwenrun_requests_in_flight"},
        "target": {"type": "AverageValue", "averageValue": "32"},  # max_num_seqs 64 x DP 1 / 2
    }}]  # fmt: skip


def test_the_autoscaled_metric_is_the_servers_gauge() -> None:
    from qwenrun.agent.observability import Metrics

    metrics = Metrics()
    metrics.in_flight.labels("/v1/chat/completions").inc()
    assert f"{IN_FLIGHT_METRIC}{{" in metrics.exposition()[0].decode()


@pytest.mark.parametrize(
    ("agent_name", "expected"),
    [("Weather_Bot.v2", "weather-bot-v2"), ("42", "qwenrun-42"), ("x" * 60, "x" * 40), ("a:b--c", "a-b-c")],
)
def test_names_are_kubernetes_names(tmp_path: Path, agent_name: str, expected: str) -> None:
    plan = plan_of(tmp_path, f"model: {{path: /models/q}}\nagent: {{name: '{agent_name}'}}\n")
    assert plan.name == expected
    assert plan.api_key_secret == f"{expected}-api-key"


def test_model_path_warnings(tmp_path: Path) -> None:
    assert plan_of(tmp_path, overrides=("model.path=./weights",)).warnings[1] == (
        "model.path './weights' is not under the model volume's mount /models: the pod will not find it "
        "(e.g. --set model.path=/models/<model directory>)"
    )
    assert plan_of(tmp_path, overrides=("model.path=Qwen/Qwen2.5-7B-Instruct",)).warnings[1] == (
        "no --model-volume: every pod downloads 'Qwen/Qwen2.5-7B-Instruct' from the Hugging Face Hub "
        "when it starts (into an emptyDir)"
    )
    assert plan_of(tmp_path).warnings[1:] == [
        "model.path '/models/Qwen2.5-7B-Instruct' is a local path, but without --model-volume /models is empty"
    ]
    assert plan_of(tmp_path, model_volume=ModelVolume("pvc", "m")).warnings[1:] == []


# -- the Ray variant ------------------------------------------------------------------------------


def test_an_engine_larger_than_a_node_becomes_a_ray_cluster(tmp_path: Path) -> None:
    text = AGENT.replace(
        "engine: {",
        "engine: {pipeline_parallel_size: 3, distributed_executor_backend: ray, gpus_per_node: 2, ",
    )
    plan = plan_of(tmp_path, text, model_volume=ModelVolume("pvc", "weights"))
    assert plan.ray and plan.changes[-1] != "engine.distributed_executor_backend=ray"
    cluster = plan.manifests["raycluster.yaml"]
    head = cluster["spec"]["headGroupSpec"]["template"]
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    # TP 2 x PP 3 = 6 GPUs, 2 a node: the head pod and 2 worker pods
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (2, 2, 2)
    assert container_of(cluster)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    script = container_of(cluster)["args"][0]
    assert container_of(cluster)["command"] == ["/bin/bash", "-c", "--"]
    assert '"$KUBERAY_GEN_RAY_START_CMD" &' in script and script.endswith(f"exec qwenrun up {AGENT_PATH}\n")
    worker_volumes = {v["name"] for v in workers["template"]["spec"]["volumes"]}
    assert {"models", "dshm"} <= worker_volumes  # every Ray node loads its shard of the weights
    assert plan.manifests["service.yaml"]["spec"]["selector"] == {
        "ray.io/cluster": plan.name,
        "ray.io/node-type": "head",
    }


def test_ray_flag_switches_the_backend_in_the_configmap(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, ray=True)
    assert "engine.distributed_executor_backend=ray (the engine spans the Ray cluster)" in plan.changes
    assert AgentSpec.from_text(plan.agent_yaml).engine.distributed_executor_backend == "ray"
    assert "workerGroupSpecs" not in plan.manifests["raycluster.yaml"]["spec"]  # TP 2 fits the head pod


@pytest.mark.parametrize(
    ("overrides", "options", "message"),
    [
        (("engine.distributed_executor_backend=mp",), {"ray": True},
         "a Ray cluster needs engine.distributed_executor_backend: ray, not 'mp'"),
        ((), {"ray": True, "replicas": 2},
         "--replicas: a Ray cluster serves one engine; deploy more under other --name values"),
        (("engine.distributed_executor_backend=external_launcher",), {},
         "engine.distributed_executor_backend 'external_launcher' expects torchrun to start one process per "
         "GPU, but a pod runs one `qwenrun up`: use 'mp' (one node) or 'ray'"),
        ((), {"name": "Bad_Name"},
         "--name 'Bad_Name': a Kubernetes name is lowercase letters, digits and '-', starts with a letter "
         "and ends with a letter or digit, at most 40 characters here"),
    ],
)  # fmt: skip
def test_impossible_deployments(
    tmp_path: Path, overrides: tuple[str, ...], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(DeployError) as info:
        plan_of(tmp_path, overrides=overrides, **options)
    assert str(info.value).removeprefix(f"{tmp_path / 'agent.yaml'}: ") == message


def test_bad_agent_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        plan_of(tmp_path, overrides=("engine.available_devices=1",))
    assert str(info.value).endswith("= 2 GPUs, but available_devices is 1")


# -- files and the command line --------------------------------------------------------------------


def test_files_round_trip_and_stale_ones_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ray_plan = plan_of(tmp_path, ray=True)
    write_manifests(ray_plan.manifests, out)
    (out / "mine.yaml").write_text("kind: Mine\n")
    written = write_manifests(plan_of(tmp_path, overrides=(POSTGRES,)).manifests, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "configmap.yaml",
        "deployment.yaml",
        "hpa.yaml",
        "mine.yaml",
        "service.yaml",
    ]
    for path in written:
        text = path.read_text()
        assert text.startswith(GENERATED)
        assert "&id" not in text and "*id" not in text  # no YAML aliases for kubectl to trip on
        validate(yaml.safe_load(text))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_writes_the_files_and_says_what_next(runner: CliRunner, tmp_path: Path) -> None:
    agent = write_agent(tmp_path, AGENT)
    out = tmp_path / "k8s"
    result = runner.invoke(main, ["deploy", "k8s", agent, "-o", str(out), "--model-volume", "pvc:weights",
                                  "--namespace", "llm", "--set", "engine.max_num_seqs=32",
                                  "--set", POSTGRES])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "configmap.yaml",
        "deployment.yaml",
        "hpa.yaml",
        "service.yaml",
    ]
    assert result.stdout.splitlines()[4:] == [
        "weather-bot-v2: a Deployment, TP x PP x DP = 2 x 1 x 1",
        "next:",
        "  kubectl -n llm create secret generic weather-bot-v2-api-key --from-literal=api-key=<key>",
        "  kubectl -n llm create secret generic weather-bot-v2-database "
        "--from-literal=url=postgresql://USER:PASSWORD@HOST/DB",
        f"  kubectl -n llm apply -f {out}",
    ]
    assert result.stderr == "warning: frontend.kind=openai (was chainlit: the pod serves the OpenAI API)\n"
    hpa = yaml.safe_load((out / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "16"


def test_cli_prints_a_stream_with_dash(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["deploy", "k8s", write_agent(tmp_path, AGENT), "-o", "-", "--ray"])
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in documents] == ["ConfigMap", "RayCluster", "Service"]
    for document in documents:
        validate(document)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model-volume", "nfs:/x"], 2,
         "Invalid value for '--model-volume': 'nfs:/x': expected pvc:CLAIM or hostpath:/DIR"),
        (["--replicas", "0"], 2, "Invalid value for '--replicas': 0 is not in the range x>=1."),
        (["--model-mount", "models"], 2, "Invalid value for --model-mount: 'models' is not an absolute path"),
        (["--no-api-key", "--api-key-secret", "s"], 2, "--no-api-key and --api-key-secret contradict each other"),
        (["--set", "engine.available_devices=1"], 2,
         "{agent}: engine: tensor_parallel_size x pipeline_parallel_size x data_parallel_size = 2 x 1 x 1 "
         "= 2 GPUs, but available_devices is 1"),
        (["--set", "engine.distributed_executor_backend=mp", "--ray"], 1,
         "{agent}: a Ray cluster needs engine.distributed_executor_backend: ray, not 'mp'"),
    ],
)  # fmt: skip
def test_cli_bad_input(runner: CliRunner, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    agent = write_agent(tmp_path, AGENT)
    result = runner.invoke(main, ["deploy", "k8s", agent, "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == code, result.output
    assert message.format(agent=agent) in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_missing_and_broken_files(runner: CliRunner, tmp_path: Path) -> None:
    missing = runner.invoke(main, ["deploy", "k8s", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    assert missing.stderr.startswith(f"Error: {tmp_path / 'nope.yaml'}: cannot read file")
    broken = write_agent(tmp_path, "model: {path: x}\nengine: {max_num_seqs: 0}\n")
    result = runner.invoke(main, ["deploy", "k8s", broken, "-o", "-"])
    assert result.exit_code == 2
    assert result.stderr == f"Error: {broken}: engine.max_num_seqs: Input should be greater than 0\n"


def test_dockerfile_builds_from_files_the_context_keeps() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    }
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert copied == [["pyproject.toml", "README.md"], ["qwenrun"], ["plugins"]]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists() and source not in ignored
    assert "ARG VLLM_VERSION=0.26.0" in dockerfile and '"vllm==${VLLM_VERSION}"' in dockerfile
    assert 'pip install ".[server]" ${PLUGINS}' in dockerfile
    assert "USER 1000" in dockerfile  # the pods' fsGroup


# -- replicas and the session store --------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "flag"), [({"replicas": 2}, "--replicas"), ({"max_replicas": 3}, "--max-replicas")]
)
def test_replicas_need_the_postgres_store(tmp_path: Path, options: dict[str, Any], flag: str) -> None:
    with pytest.raises(DeployError, match=f"^{flag}: with sessions.store: sqlite each pod keeps") as info:
        plan_of(tmp_path, **options)
    assert "set sessions.store: postgres" in str(info.value)
    assert "hpa.yaml" not in plan_of(tmp_path).manifests  # one SQLite pod: no autoscaler either
    unrecorded = plan_of(tmp_path, overrides=("sessions.enabled=false",), replicas=2)
    assert "hpa.yaml" in unrecorded.manifests


def test_postgres_replicas_read_the_database_url_from_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONS_DB", "postgresql://u:hunter2@db/q")  # the file is checked as `up` would
    text = AGENT + "sessions: {store: postgres, url: '${SESSIONS_DB}'}\n"
    plan = plan_of(tmp_path, text, replicas=3, database_secret="pg-url")
    env = container_of(plan.manifests["deployment.yaml"])["env"]
    assert {"name": "SESSIONS_DB", "valueFrom": {"secretKeyRef": {"name": "pg-url", "key": "url"}}} in env
    assert "${SESSIONS_DB}" in plan.manifests["configmap.yaml"]["data"]["agent.yaml"]
    assert "hunter2" not in render_all(plan.manifests)
    assert plan.manifests["hpa.yaml"]["spec"]["minReplicas"] == 3
    for manifest in plan.manifests.values():
        validate(manifest)
    default = plan_of(tmp_path, overrides=(POSTGRES,), replicas=2)
    env = container_of(default.manifests["deployment.yaml"])["env"]
    assert {"name": "QWENRUN_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": "weather-bot-v2-database", "key": "url"}}} in env  # fmt: skip
    literal = AGENT + "sessions: {store: postgres, url: 'postgresql://u:hunter2@db/q'}\n"
    with pytest.raises(
        DeployError, match=r"sessions.url: write sessions.url: \$\{QWENRUN_DATABASE_URL\}"
    ) as info:
        plan_of(tmp_path, literal)
    assert "hunter2" not in str(info.value)


# -- the engine tier: vLLM production-stack Helm values, agent pods of engine.kind openai -----------

CHART = ROOT / "tests" / "data" / "production-stack"  # vendored: see its SOURCE.md
CHART_SCHEMA = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
CHART_DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
TIER = EngineTier()
HERMES_TEMPLATE = (
    '{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>\n{"name": ...}\n</tool_call>'
)
CODER_TEMPLATE = "{% for tool in tools %}<function={{ tool.name }}><parameter=x>{% endfor %}"


def helm_merge(defaults: Any, values: Any) -> Any:
    """The values Helm renders (and checks against values.schema.json): maps merged key by key,
    everything else (lists included) replaced by the user's value."""
    if isinstance(defaults, dict) and isinstance(values, dict):
        merged = dict(defaults)
        for key, value in values.items():
            merged[key] = helm_merge(defaults.get(key), value)
        return merged
    return copy.deepcopy(values)


def strict(schema: Any) -> Any:
    """The chart's schema with no undeclared keys: every object listing properties allows only them."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


STRICT_SCHEMA = strict(CHART_SCHEMA)


def validate_values(values: dict[str, Any]) -> None:
    """Raise unless ``values`` pass the chart's schema as ``helm install`` applies it (merged into
    the chart's defaults) and strictly (every key one the chart declares)."""
    jsonschema.Draft202012Validator.check_schema(CHART_SCHEMA)
    jsonschema.validate(helm_merge(CHART_DEFAULTS, values), CHART_SCHEMA, jsonschema.Draft202012Validator)
    jsonschema.validate(values, STRICT_SCHEMA, jsonschema.Draft202012Validator)


def model_folder(tmp_path: Path, template: str) -> Path:
    folder = tmp_path / "models" / "qwen"
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    return folder


def engine_args(plan: K8sPlan) -> list[str]:
    assert plan.engine_values is not None
    return list(plan.engine_values["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["extraArgs"])


def flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, args
    return args[args.index(flag) + 1]


def pod_agent(plan: K8sPlan) -> AgentSpec:
    return AgentSpec.from_text(plan.manifests["configmap.yaml"]["data"]["agent.yaml"], source="pod")


def test_engine_tier_of_a_hermes_agent(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, HERMES_TEMPLATE)  # tool_call_format auto: read from the template
    text = AGENT.replace("/models/Qwen2.5-7B-Instruct", str(folder)).replace(
        "max_num_seqs: 64}",
        "max_num_seqs: 64, max_model_len: 16384, dtype: bfloat16, gpu_memory_utilization: 0.8}",
    )
    plan = plan_of(tmp_path, text, overrides=(POSTGRES,), replicas=2, engine_tier=TIER,
                   model_volume=ModelVolume("pvc", "weights"), model_mount=str(tmp_path / "models"))  # fmt: skip
    values = plan.engine_values
    assert values is not None
    validate_values(values)
    (model,) = values["servingEngineSpec"]["modelSpec"]
    assert model["modelURL"] == str(folder)
    assert model["vllmConfig"] == {
        "dtype": "bfloat16", "tensorParallelSize": 2, "maxNumSeqs": 64, "gpuMemoryUtilization": 0.8,
        "enablePrefixCaching": True, "maxModelLen": 16384, "extraArgs": engine_args(plan),
    }  # fmt: skip
    args = engine_args(plan)
    assert args[:3] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert "--reasoning-parser" not in args  # thinking left to the template: qwenrun reads <think> itself
    assert flag_value(args, "--served-model-name") == "qwen"
    assert json.loads(flag_value(args, "--structured-outputs-config")) == {
        "backend": "xgrammar", "disable_any_whitespace": True,
    }  # fmt: skip
    assert "--disable-log-stats" not in args  # the router reads the engine's metrics
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2"  # TP 2
    assert (model["repository"], model["tag"]) == ("vllm/vllm-openai", "v0.26.0")
    assert model["extraVolumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "weights"}}]
    assert model["extraVolumeMounts"] == [{"name": "models", "mountPath": str(tmp_path / "models")}]
    served = pod_agent(plan)
    assert served.model.tool_call_format == "hermes"  # auto resolved: the agent reads what the engine parses
    assert plan.warnings == ["frontend.kind=openai (was chainlit: the pod serves the OpenAI API)"]


def test_engine_tier_of_a_thinking_qwen3_coder_agent(tmp_path: Path) -> None:
    text = """\
model: {path: Qwen/Qwen3-Coder-30B-A3B-Instruct, tool_call_format: qwen3_coder, revision: main}
engine:
  tensor_parallel_size: 2
  pipeline_parallel_size: 2
  data_parallel_size: 2
  enforce_eager: true
  env: {VLLM_USE_DEEP_GEMM: "0"}
  extra: {enable_expert_parallel: true, kv_cache_dtype: fp8, compilation_config: {level: 3}}
agent: {name: coder, enable_thinking: true, thinking_budget: 2048}
frontend: {kind: openai}
"""
    tier = EngineTier(release="coder-engine", replicas=3, image="registry.example:5000/vllm:v1", cpu="8")
    plan = plan_of(tmp_path, text, engine_tier=tier)
    values = plan.engine_values
    assert values is not None
    validate_values(values)
    (model,) = values["servingEngineSpec"]["modelSpec"]
    args = engine_args(plan)
    assert flag_value(args, "--tool-call-parser") == "qwen3_coder"
    assert "--enable-auto-tool-choice" in args
    assert flag_value(args, "--reasoning-parser") == "qwen3"
    assert json.loads(flag_value(args, "--structured-outputs-config"))["enable_in_reasoning"] is True
    assert [flag_value(args, f"--{k}-parallel-size") for k in ("pipeline", "data")] == ["2", "2"]
    assert "--enforce-eager" in args and "--enable-expert-parallel" in args
    assert flag_value(args, "--kv-cache-dtype") == "fp8"
    assert json.loads(flag_value(args, "--compilation-config")) == {"level": 3}
    assert "--served-model-name" not in args  # the model is served under its path
    assert model["modelRevision"] == "main"
    assert model["env"] == [{"name": "VLLM_USE_DEEP_GEMM", "value": "0"}]
    assert model["replicaCount"] == 3
    assert model["resources"]["requests"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "8"}  # 2x2x2
    assert (model["repository"], model["tag"]) == ("registry.example:5000/vllm", "v1")
    assert values["servingEngineSpec"]["labels"] == {"environment": "qwenrun", "release": "coder-engine"}
    served = pod_agent(plan)
    assert served.engine.model_dump(exclude_defaults=True) == {
        "kind": "openai", "base_url": "http://coder-engine-router-service:80/v1",
        "model": "Qwen/Qwen3-Coder-30B-A3B-Instruct", "api_key_env": "QWENRUN_ENGINE_API_KEY",
    }  # fmt: skip
    assert served.model.tool_call_format == "qwen3_coder"
    assert served.agent.enable_thinking is True and served.agent.thinking_budget == 2048


def test_tool_call_format_auto_follows_the_local_template_else_hermes_with_a_warning(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, CODER_TEMPLATE)
    plan = plan_of(tmp_path, overrides=(f"model.path={folder}",), engine_tier=TIER)
    assert flag_value(engine_args(plan), "--tool-call-parser") == "qwen3_coder"
    assert pod_agent(plan).model.tool_call_format == "qwen3_coder"
    assert "#   model.tool_call_format=qwen3_coder (the engine's --tool-call-parser)" in plan.agent_yaml
    remote = plan_of(tmp_path, overrides=("model.path=Qwen/Qwen3-8B",), engine_tier=TIER)
    assert flag_value(engine_args(remote), "--tool-call-parser") == "hermes"
    assert remote.warnings[-1].startswith(
        "model.tool_call_format auto: the chat template of 'Qwen/Qwen3-8B' is not readable here"
    )


def test_agent_tier_points_at_the_charts_router_service(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, overrides=(POSTGRES,), replicas=2, max_replicas=5, engine_tier=TIER,
                   namespace="llm", api_key_secret="agent-key")  # fmt: skip
    assert plan.release == plan.name == "weather-bot-v2"
    values = plan.engine_values
    assert values is not None
    # the router Service as the chart's template names it, on the port the values give it
    template = (CHART / "service-router.yaml").read_text(encoding="utf-8")
    (service_name,) = re.findall(r'^  name: "(.+)"$', template, re.MULTILINE)
    assert "port: {{ .Values.routerSpec.servicePort }}" in template
    port = helm_merge(CHART_DEFAULTS, values)["routerSpec"]["servicePort"]
    router = f"http://{service_name.replace('{{ .Release.Name }}', plan.release)}:{port}/v1"
    assert router == "http://weather-bot-v2-router-service:80/v1"
    served = pod_agent(plan)
    assert isinstance(served.engine, OpenAIEngineSpec)
    assert (served.engine.base_url, served.engine.model) == (router, "qwen")  # the --served-model-name
    assert served.sessions.store == "postgres"
    assert set(plan.manifests) == {"configmap.yaml", "deployment.yaml", "hpa.yaml", "service.yaml"}
    for manifest in plan.manifests.values():
        validate(manifest)
    pod = plan.manifests["deployment.yaml"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    assert "tolerations" not in pod and [v["name"] for v in pod["volumes"]] == ["agent"]
    assert not any(env["name"] == "HF_HOME" for env in container["env"])
    engine_key = {"name": "QWENRUN_ENGINE_API_KEY",
                  "valueFrom": {"secretKeyRef": {"name": "weather-bot-v2-engine-api-key", "key": "api-key"}}}  # fmt: skip
    assert engine_key in container["env"]
    assert values["servingEngineSpec"]["vllmApiKey"] == {
        "secretName": "weather-bot-v2-engine-api-key", "secretKey": "api-key",
    }  # fmt: skip
    (wait,) = pod["initContainers"]
    assert wait["command"][3:] == [router, "qwen", "1800", "QWENRUN_ENGINE_API_KEY"]
    assert wait["env"] == [engine_key]
    compile(wait["command"][2], "wait-for-engine", "exec")
    hpa = plan.manifests["hpa.yaml"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["metrics"][0]["pods"]["target"]["averageValue"] == "32"  # an agent pod's default


def test_the_wait_for_engine_script_waits_for_the_served_model(tmp_path: Path) -> None:
    import http.server
    import subprocess
    import sys
    import threading

    answers = [{"data": []}, {"data": [{"id": "qwen"}]}]
    seen: list[str | None] = []

    class Router(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = json.dumps(answers[min(len(seen) - 1, 1)]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Router)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        plan = plan_of(tmp_path, engine_tier=TIER)
        (wait,) = plan.manifests["deployment.yaml"]["spec"]["template"]["spec"]["initContainers"]
        script = wait["command"][2].replace("time.sleep(5)", "time.sleep(0.05)")
        url = f"http://127.0.0.1:{server.server_port}/v1"
        done = subprocess.run([sys.executable, "-c", script, url, "qwen", "30", "KEY"], capture_output=True,
                              text=True, timeout=60, env={"KEY": "s3cret"})  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"{url}/models serves [], not yet qwen",
            f"{url}/models serves qwen",
        ]
        assert seen == ["Bearer s3cret", "Bearer s3cret"]
        late = subprocess.run([sys.executable, "-c", script, url, "other", "0"], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert late.returncode == 1 and late.stderr.strip() == f"{url}/models did not serve other within 0 s"
    finally:
        server.shutdown()
        server.server_close()


def chart_command(values: dict[str, Any]) -> list[str]:
    """The arguments of ``vllm serve`` as the chart's ``deployment-vllm-multi.yaml`` renders them
    from the fields qwenrun writes (each of its lines checked to be in the vendored template)."""
    template = (CHART / "deployment-vllm-multi.yaml").read_text(encoding="utf-8")
    (model,) = values["servingEngineSpec"]["modelSpec"]
    config = model["vllmConfig"]
    assert not {"enableLoRA", "enableTool", "toolCallParser", "chatTemplate", "lmcacheConfig"} & set(model)
    assert '- {{ $modelSpec.modelURL | quote }}\n          - "--host"\n          - "0.0.0.0"' in template
    args = [model["modelURL"], "--host", "0.0.0.0", "--port", "8000"]
    caching = "--enable-prefix-caching" if config.get("enablePrefixCaching") else "--no-enable-prefix-caching"
    assert f'- "{caching}"' in template
    args.append(caching)
    for key, flag in [("maxModelLen", "--max-model-len"), ("dtype", "--dtype"),
                      ("tensorParallelSize", "--tensor-parallel-size"), ("maxNumSeqs", "--max-num-seqs"),
                      ("gpuMemoryUtilization", "--gpu_memory_utilization")]:  # fmt: skip
        assert f'hasKey . "{key}" }}}}\n          - "{flag}"' in template, key
        if key in config:
            args += [flag, str(config[key])]
    assert "range .extraArgs" in template
    args += config["extraArgs"]
    if model.get("modelRevision"):
        assert '- "--revision"\n          - {{ $modelSpec.modelRevision | quote }}' in template
        args += ["--revision", model["modelRevision"]]
    return args


@pytest.fixture(scope="module")
def vllm_serve() -> Any:
    """The installed vLLM's ``vllm serve`` argument parser."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def test_vllm_serve_accepts_the_command_the_chart_renders(tmp_path: Path, vllm_serve: Any) -> None:
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    text = AGENT.replace("max_num_seqs: 64}", "max_num_seqs: 64, max_model_len: 8192, pipeline_parallel_size: 2, "
                         "enforce_eager: true, extra: {enable_expert_parallel: true, kv_cache_dtype: fp8}}")  # fmt: skip
    for overrides, parser, reasoning in [
        ((), "hermes", None),
        (("model.tool_call_format=qwen3_coder", "agent.enable_thinking=true", "model.revision=main"),
         "qwen3_coder", "qwen3"),
    ]:  # fmt: skip
        values = plan_of(tmp_path, text, overrides=overrides, engine_tier=TIER).engine_values
        assert values is not None
        parsed = vllm_serve.parse_args(chart_command(values))
        validate_parsed_serve_args(parsed)
        assert (parsed.model_tag, parsed.served_model_name) == ("/models/Qwen2.5-7B-Instruct", ["qwen"])
        assert (parsed.enable_auto_tool_choice, parsed.tool_call_parser, parsed.reasoning_parser) == (
            True, parser, reasoning or "",
        )  # fmt: skip
        assert ToolParserManager.get_tool_parser(parser) is not None
        if reasoning:
            assert ReasoningParserManager.get_reasoning_parser(reasoning) is not None
        assert (parsed.tensor_parallel_size, parsed.pipeline_parallel_size, parsed.max_model_len) == (
            2,
            2,
            8192,
        )
        assert (parsed.max_num_seqs, parsed.gpu_memory_utilization, parsed.dtype) == (64, 0.9, "auto")
        assert parsed.enable_prefix_caching is True and parsed.enforce_eager is True
        assert parsed.enable_expert_parallel is True and parsed.kv_cache_dtype == "fp8"
        assert parsed.structured_outputs_config.backend == "xgrammar"
        assert parsed.structured_outputs_config.enable_in_reasoning is bool(reasoning)
        assert parsed.revision == ("main" if reasoning else None)


def test_the_values_validators_reject_what_the_chart_would(tmp_path: Path) -> None:
    values = plan_of(tmp_path, engine_tier=TIER).engine_values
    assert values is not None
    broken = copy.deepcopy(values)
    broken["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["tensorParallelSize"] = "2"
    with pytest.raises(jsonschema.ValidationError, match="'2' is not of type 'integer'"):
        validate_values(broken)
    broken = copy.deepcopy(values)
    broken["routerSpec"]["routingLogic"] = "random"
    with pytest.raises(jsonschema.ValidationError, match="'random' is not one of"):
        validate_values(broken)
    broken = copy.deepcopy(values)
    broken["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["reasoningParser"] = "qwen3"  # not a chart key
    with pytest.raises(jsonschema.ValidationError, match="'reasoningParser' was unexpected"):
        validate_values(broken)


def test_an_openai_agent_deploys_as_agent_pods_without_an_engine(tmp_path: Path) -> None:
    text = "model: {path: qwen}\nengine: {kind: openai, base_url: 'http://vllm.llm.svc:8000/v1'}\n"
    plan = plan_of(tmp_path, text, overrides=("sessions.enabled=false",), replicas=3)
    assert plan.engine is None and plan.engine_values is None and plan.release is None
    assert pod_agent(plan).engine.base_url == "http://vllm.llm.svc:8000/v1"  # type: ignore[union-attr]
    pod = plan.manifests["deployment.yaml"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in str(pod["containers"][0]["resources"])
    # no warning of a missing model volume: the model runs elsewhere
    assert plan.warnings == ["frontend.kind=openai (was cli: the pod serves the OpenAI API)"]
    for manifest in plan.manifests.values():
        validate(manifest)


@pytest.mark.parametrize(
    ("text", "overrides", "options", "message"),
    [
        ("model: {path: q}\nengine: {kind: openai, base_url: 'http://e/v1'}\n", (), {},
         "engine.kind: 'openai': --engine-tier serves the agent's model with its engine section, but this "
         "agent's model already runs elsewhere (its base_url): deploy it without --engine-tier"),
        (AGENT, ("engine.distributed_executor_backend=ray",), {},
         "engine: an engine over several nodes (Ray) is not written for the production-stack chart (its "
         "raySpec): deploy it without --engine-tier (a KubeRay RayCluster), or with TP x PP x DP within one node"),
        (AGENT, (), {"ray": True},
         "--ray: with --engine-tier the engine runs in the chart's pods, not in a RayCluster"),
        (AGENT, (), {"tier": EngineTier(image="vllm/vllm-openai")},
         "--engine-image 'vllm/vllm-openai': give REPOSITORY:TAG (the chart runs repository:tag; no digests)"),
        (AGENT, (), {"tier": EngineTier(release="x" * 44)},
         f"--engine-release '{'x' * 44}': a Kubernetes name is lowercase letters, digits and '-', starts with "
         "a letter and ends with a letter or digit, at most 43 characters here"),
        (AGENT, (), {"tier": EngineTier(replicas=2), "replicas": 2},
         "--replicas: with sessions.store: sqlite each pod keeps its sessions"),
    ],
)  # fmt: skip
def test_impossible_engine_tiers(
    tmp_path: Path, text: str, overrides: tuple[str, ...], options: dict[str, Any], message: str
) -> None:
    tier = options.pop("tier", TIER)
    with pytest.raises(DeployError) as info:
        plan_of(tmp_path, text, overrides=overrides, engine_tier=tier, **options)
    assert str(info.value).removeprefix(f"{tmp_path / 'agent.yaml'}: ").startswith(message)


def test_ray_for_an_agent_without_an_engine_is_refused(tmp_path: Path) -> None:
    text = "model: {path: q}\nengine: {kind: openai, base_url: 'http://e/v1'}\n"
    with pytest.raises(DeployError, match=r"--ray: engine\.kind: openai: the pods run no engine"):
        plan_of(tmp_path, text, ray=True)


def test_cli_writes_engine_values_and_the_agent_tier(runner: CliRunner, tmp_path: Path) -> None:
    agent = write_agent(tmp_path, AGENT)
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "deployment.yaml").write_text(GENERATED + "kind: Deployment\n")  # from a one-tier run: removed
    result = runner.invoke(main, ["deploy", "k8s", agent, "-o", str(out), "--engine-tier", "production-stack",
                                  "--engine-replicas", "2", "--set", POSTGRES, "--replicas", "2",
                                  "--model-volume", "pvc:weights", "--namespace", "llm"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.yaml")) == [
        "agent/configmap.yaml", "agent/deployment.yaml", "agent/hpa.yaml", "agent/service.yaml", "engine-values.yaml",
    ]  # fmt: skip
    values = yaml.safe_load((out / "engine-values.yaml").read_text())
    validate_values(values)
    assert values["servingEngineSpec"]["modelSpec"][0]["replicaCount"] == 2
    for path in (out / "agent").glob("*.yaml"):
        validate(yaml.safe_load(path.read_text()))
    assert result.stdout.splitlines()[5:] == [
        "weather-bot-v2: agent pods (a Deployment) and the vllm-stack release 'weather-bot-v2', TP x PP x DP = 2 x 1 x 1",
        "next:",
        "  kubectl -n llm create secret generic weather-bot-v2-api-key --from-literal=api-key=<key>",
        "  kubectl -n llm create secret generic weather-bot-v2-engine-api-key --from-literal=api-key=<engine key>",
        "  kubectl -n llm create secret generic weather-bot-v2-database "
        "--from-literal=url=postgresql://USER:PASSWORD@HOST/DB",
        "  helm repo add vllm https://vllm-project.github.io/production-stack",
        f"  helm install -n llm weather-bot-v2 vllm/vllm-stack -f {out / 'engine-values.yaml'}",
        f"  kubectl -n llm apply -f {out / 'agent'}",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine-tier", "production-stack", "-o", "-"],
         "--engine-tier writes Helm values and manifests apart: give -o DIR, not '-'"),
        (["--engine-replicas", "2"], "--engine-replicas needs --engine-tier"),
        (["--engine-tier", "kserve"], "Invalid value for '--engine-tier': 'kserve' is not 'production-stack'."),
        (["--engine-tier", "production-stack", "--no-api-key", "--engine-api-key-secret", "s"],
         "--no-api-key and --engine-api-key-secret contradict each other"),
    ],
)  # fmt: skip
def test_cli_bad_engine_tier_options(
    runner: CliRunner, tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(main, ["deploy", "k8s", write_agent(tmp_path, AGENT), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
