"""``qwenrun deploy k8s``: manifests validated against the Kubernetes API schemas (strict JSON
schemas shipped offline by ``kubernetes-validate``), their wiring (selectors, ports, probes, GPUs,
Secret, ConfigMap), the KubeRay variant, and the command line (files, exit codes, messages)."""

from __future__ import annotations

import copy
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
    K8sOptions,
    K8sPlan,
    ModelVolume,
    plan_k8s,
    render_all,
    write_manifests,
)
from qwenrun.deploy.files import GENERATED
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
    from qwenrun.frontends.openai.metrics import Metrics

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
