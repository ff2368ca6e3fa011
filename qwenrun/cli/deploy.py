"""``qwenrun deploy``: the command line of :mod:`qwenrun.deploy` (registered by :mod:`qwenrun.cli.main`).

Exit codes as in the rest of the CLI: 2 for a bad agent file or a bad option, 1 for an agent that
cannot be deployed as asked. Warnings go to stderr, the files written and the next steps to stdout.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from qwenrun.cli.common import errors
from qwenrun.deploy.files import render_all, write_manifests
from qwenrun.deploy.k8s import plan_k8s
from qwenrun.deploy.options import (
    DEFAULT_ENGINE_IMAGE,
    DEFAULT_IMAGE,
    EngineTier,
    K8sOptions,
    K8sPlan,
    ModelVolume,
)
from qwenrun.deploy.production_stack import CHART

__all__ = ["deploy"]


def _model_volume(ctx: click.Context, param: click.Parameter, value: str | None) -> ModelVolume | None:
    if value is None:
        return None
    try:
        return ModelVolume.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group()
def deploy() -> None:
    """Write deployment files for an agent (Kubernetes)."""


@deploy.command("k8s")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", metavar="DIR", help="Where to write (default: k8s/NAME); '-' prints them.")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The server image (see Dockerfile).")
@click.option("--name", help="Name of the Kubernetes objects (default: from agent.name).")
@click.option("--namespace", help="Namespace of the objects (default: kubectl's).")
@click.option(
    "--model-volume",
    metavar="pvc:CLAIM|hostpath:/DIR",
    callback=_model_volume,
    help="Volume holding the weights (or the Hugging Face cache), mounted at --model-mount.",
)
@click.option("--model-mount", default="/models", show_default=True, help="Where the pods see it.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(min=1), help="Autoscaler bound (default: 2 x replicas).")
@click.option(
    "--target-in-flight",
    type=click.IntRange(min=1),
    help="Requests in flight per pod the autoscaler aims at (default: max_num_seqs x DP / 2).",
)
@click.option("--api-key-secret", metavar="SECRET", help="Secret with key 'api-key' (default: NAME-api-key).")
@click.option(
    "--database-secret", metavar="SECRET",
    help="sessions.store: postgres: Secret with key 'url' (default: NAME-database).",
)  # fmt: skip
@click.option("--no-api-key", is_flag=True, help="Serve without an API key (warned).")
@click.option("--ray", is_flag=True, help="A KubeRay RayCluster (default when TP x PP x DP > gpus_per_node).")
@click.option("--cpu", help="CPU request of a pod (default: 4 with an engine, 1 without).")
@click.option(
    "--memory", help="Memory request and limit of a pod (default: 32Gi with an engine, 2Gi without)."
)
@click.option(
    "--engine-tier", type=click.Choice(["production-stack"]),
    help="Serve the model apart: Helm values of vLLM's production-stack chart (engine-values.yaml) "
    "and agent pods of engine.kind openai in front of its router (agent/).",
)  # fmt: skip
@click.option("--engine-replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--engine-tier: engine pods behind the router.")  # fmt: skip
@click.option("--engine-image", default=DEFAULT_ENGINE_IMAGE, show_default=True, metavar="REPOSITORY:TAG",
              help="--engine-tier: the vllm serve image.")  # fmt: skip
@click.option("--engine-release", metavar="RELEASE", help="--engine-tier: the Helm release (default: NAME).")
@click.option(
    "--engine-cpu", default="4", show_default=True, help="--engine-tier: CPU request of an engine pod."
)
@click.option(
    "--engine-memory", default="32Gi", show_default=True, help="--engine-tier: memory of an engine pod."
)
@click.option(
    "--engine-api-key-secret",
    metavar="SECRET",
    help="--engine-tier: Secret with key 'api-key' the engine requires (default: NAME-engine-api-key).",
)
@click.option("--shm-size", default="16Gi", show_default=True, help="Size of /dev/shm (NCCL).")
@click.option("--startup-timeout", type=click.IntRange(min=60), default=1800, show_default=True,
              help="Seconds the model may take to load before the pod is restarted.")  # fmt: skip
@click.option("--grace-period", type=click.IntRange(min=0), default=120, show_default=True,
              help="Seconds running requests get to finish when a pod stops.")  # fmt: skip
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a value of the file, e.g. --set engine.tensor_parallel_size=2.")  # fmt: skip
def k8s(
    file: str,
    output: str | None,
    image: str,
    name: str | None,
    namespace: str | None,
    model_volume: ModelVolume | None,
    model_mount: str,
    replicas: int,
    max_replicas: int | None,
    target_in_flight: int | None,
    api_key_secret: str | None,
    database_secret: str | None,
    no_api_key: bool,
    ray: bool,
    cpu: str | None,
    memory: str | None,
    engine_tier: str | None,
    engine_replicas: int,
    engine_image: str,
    engine_release: str | None,
    engine_cpu: str,
    engine_memory: str,
    engine_api_key_secret: str | None,
    shm_size: str,
    startup_timeout: int,
    grace_period: int,
    overrides: tuple[str, ...],
) -> None:
    """Write Kubernetes manifests that serve FILE's agent with its OpenAI-compatible server (with
    --engine-tier: and the Helm values of the engine tier it uses)."""
    if no_api_key and (api_key_secret or engine_api_key_secret):
        flag = "--api-key-secret" if api_key_secret else "--engine-api-key-secret"
        raise click.UsageError(f"--no-api-key and {flag} contradict each other")
    ctx = click.get_current_context()
    tier_options = ("engine_replicas", "engine_image", "engine_release", "engine_cpu", "engine_memory",
                    "engine_api_key_secret")  # fmt: skip
    given = [name for name in tier_options if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given and engine_tier is None:
        raise click.UsageError(f"--{given[0].replace('_', '-')} needs --engine-tier")
    if engine_tier is not None and output == "-":
        raise click.UsageError("--engine-tier writes Helm values and manifests apart: give -o DIR, not '-'")
    tier = None
    if engine_tier is not None:
        tier = EngineTier(
            release=engine_release, replicas=engine_replicas, image=engine_image, cpu=engine_cpu,
            memory=engine_memory, api_key_secret=engine_api_key_secret,
        )  # fmt: skip
    if not model_mount.startswith("/"):
        raise click.BadParameter(f"{model_mount!r} is not an absolute path", param_hint="--model-mount")
    options = K8sOptions(
        image=image, name=name, namespace=namespace, replicas=replicas, max_replicas=max_replicas,
        target_in_flight=target_in_flight, model_volume=model_volume, model_mount=model_mount,
        api_key=not no_api_key, api_key_secret=api_key_secret, database_secret=database_secret,
        ray=ray, cpu=cpu, memory=memory, engine_tier=tier,
        shm_size=shm_size, startup_timeout_s=startup_timeout, grace_period_s=grace_period,
    )  # fmt: skip
    with errors():
        plan = plan_k8s(file, overrides, options)
        for warning in plan.warnings:
            click.echo(f"warning: {warning}", err=True)
        if output == "-":
            click.echo(render_all(plan.manifests), nl=False)
            return
        directory = output or f"k8s/{plan.name}"
        agent_directory = directory if plan.engine_values is None else str(Path(directory) / "agent")
        if plan.engine_values is not None:
            for path in write_manifests({"engine-values.yaml": plan.engine_values}, directory):
                click.echo(f"wrote {path}")
        for path in write_manifests(plan.manifests, agent_directory):
            click.echo(f"wrote {path}")
    _next_steps(plan, namespace, directory, agent_directory)


def _next_steps(plan: K8sPlan, namespace: str | None, directory: str, agent_directory: str) -> None:
    engine = plan.engine
    if engine is None:
        click.echo(f"{plan.name}: a Deployment of agent pods without an engine (engine.kind: openai)")
    else:
        sizes = engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.data_parallel_size
        kind = "a KubeRay RayCluster" if plan.ray else "a Deployment"
        if plan.release is not None:
            kind = f"agent pods (a Deployment) and the {CHART} release {plan.release!r}"
        click.echo(f"{plan.name}: {kind}, TP x PP x DP = {' x '.join(map(str, sizes))}")
    in_namespace = f" -n {namespace}" if namespace else ""
    click.echo("next:")
    secrets = [(plan.api_key_secret, "api-key=<key>"), (plan.engine_api_key_secret, "api-key=<engine key>"),
               (plan.database_secret, "url=postgresql://USER:PASSWORD@HOST/DB")]  # fmt: skip
    for secret, literal in secrets:
        if secret:
            click.echo(f"  kubectl{in_namespace} create secret generic {secret} --from-literal={literal}")
    if plan.release is not None:
        click.echo("  helm repo add vllm https://vllm-project.github.io/production-stack")
        values = Path(directory) / "engine-values.yaml"
        click.echo(f"  helm install{in_namespace} {plan.release} vllm/{CHART} -f {values}")
    click.echo(f"  kubectl{in_namespace} apply -f {agent_directory}")
