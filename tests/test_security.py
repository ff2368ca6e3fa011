"""Safe defaults: loopback binding, the API key, request limits, the template sandbox, plain-data
YAML, code loaded only from installed entry points, and secrets kept out of output and logs."""

from __future__ import annotations

import contextlib
import hmac
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from click.testing import CliRunner
from fastapi import FastAPI
from loopback import serve_in_loop

from qwenrun.agent import Agent
from qwenrun.cli import common as cli
from qwenrun.cli import main as cli_main
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine
from qwenrun.errors import ConfigError
from qwenrun.frontends.openai import create_app, serve
from qwenrun.frontends.settings import ChainlitFrontend, OpenAIFrontend
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent
SERVED, AGENT_NAME = "secure-model", "secure-agent"
USER = [{"role": "user", "content": "hi"}]
SECRET = "sk-qwenrun-5ecret-7f3a9c1e"  # a fake secret the tests look for
SECRET_ENV = "QWENRUN_TEST_SECRET"


def spec_of(frontend: dict[str, Any] | None = None, **sections: Any) -> AgentSpec:
    data: dict[str, Any] = {
        "model": {"path": "/models/secure", "served_model_name": SERVED},
        "agent": {"name": AGENT_NAME},
        "frontend": {"kind": "openai", **(frontend or {})},
    }
    data.update(sections)
    return AgentSpec.from_dict(data, source="secure.yaml")


def error_of(text: str, source: str = "agent.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        AgentSpec.from_text(text, source=source)
    return str(info.value)


@contextlib.asynccontextmanager
async def serving(app: FastAPI, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` on a free port of 127.0.0.1 (a task of this event loop), and a client of it."""
    async with (
        serve_in_loop(
            app, timeout_graceful_shutdown=2, start_timeout_s=5, stop_timeout_s=15, **config
        ) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield client


# -- binding --------------------------------------------------------------------------------------


def test_front_ends_bind_loopback_unless_told_otherwise() -> None:
    assert OpenAIFrontend.model_validate({"kind": "openai"}).host == "127.0.0.1"
    assert ChainlitFrontend.model_validate({"kind": "chainlit"}).host == "127.0.0.1"
    for path in sorted((ROOT / "agents").glob("*.yaml")):
        frontend = AgentSpec.from_file(path).frontend
        assert getattr(frontend, "host", "127.0.0.1") == "127.0.0.1", path


@pytest.mark.parametrize(
    ("host", "key", "warning"),
    [
        (None, None, None),
        ("127.0.0.1", None, None),
        ("::1", None, None),
        ("localhost", None, None),
        ("0.0.0.0", "a-key", None),
        ("0.0.0.0", None, "serving on 0.0.0.0 without an API key: anyone who can reach this port can use "
                           "the model (set frontend.api_key_env)"),
        ("::", None, "serving on :: without an API key: anyone who can reach this port can use the model "
                     "(set frontend.api_key_env)"),
        ("192.168.1.20", None, "serving on 192.168.1.20 without an API key: anyone who can reach this port "
                               "can use the model (set frontend.api_key_env)"),
    ],
)  # fmt: skip
def test_serve_binds_what_it_is_told_and_warns_when_public_without_a_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    host: str | None, key: str | None, warning: str | None,
) -> None:  # fmt: skip
    ran: dict[str, Any] = {}

    def run(server: uvicorn.Server, sockets: Any = None) -> None:
        ran.update(host=server.config.host, port=server.config.port)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    frontend: dict[str, Any] = {} if host is None else {"host": host}
    if key:
        monkeypatch.setenv("QWENRUN_TEST_KEY", key)
        frontend["api_key_env"] = "QWENRUN_TEST_KEY"
    with caplog.at_level(logging.WARNING):
        serve(Agent(spec_of(frontend), ScriptedEngine([]), tools=[]))
    assert ran["host"] == (host or "127.0.0.1")
    assert [record.getMessage() for record in caplog.records] == ([warning] if warning else [])


# -- the API key ------------------------------------------------------------------------------------


async def test_the_api_key_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every key a client sends is checked with hmac.compare_digest (no early exit on the first
    differing byte), and no key, right or wrong, reaches the logs or an answer."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    engine = ScriptedEngine(lambda request: "ok")
    app = create_app(Agent(spec_of({"api_key_env": SECRET_ENV}), engine, tools=[]))
    wrong = [SECRET[:-1] + "X", SECRET[:-1], SECRET + "0", "sk-short"]
    caplog.set_level(logging.DEBUG)
    async with serving(app, log_config=None, log_level="debug", access_log=True) as client:
        body = {"model": SERVED, "messages": USER}
        for given in wrong:
            headers = {"Authorization": f"Bearer {given}"}
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 401 and given not in response.text
            assert response.json()["error"] == {"message": "Incorrect API key provided",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}  # fmt: skip
        response = await client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert response.status_code == 200 and SECRET not in response.text
        missing = await client.post("/v1/chat/completions", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert compared == [(given.encode(), SECRET.encode()) for given in [*wrong, SECRET]]
    assert len(engine.calls) == 1
    assert '"POST /v1/chat/completions HTTP/1.1" 401' in caplog.text  # uvicorn's access log was captured
    for secret in (SECRET, *wrong):
        assert secret not in caplog.text


def test_a_key_given_instead_of_its_variable_name_is_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``api_key_env: ${QWENRUN_API_KEY}`` (the key, not the name of its variable) is refused
    without printing the key, by create_app and by ``qwenrun up``."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv("QWENRUN_TEST_PLAIN_SECRET", "abcdef0123456789")  # also a valid variable name
    expected = (
        "secure.yaml: frontend.api_key_env: must be the name of the environment variable that holds "
        "the key (e.g. QWENRUN_API_KEY), not the key itself"
    )
    for value in (SECRET, "abcdef0123456789"):
        with pytest.raises(ConfigError) as info:
            create_app(Agent(spec_of({"api_key_env": value}), ScriptedEngine([]), tools=[]))
        assert str(info.value) == expected
    agent_file = ROOT / "agents" / "calculator.yaml"  # frontend openai, api_key_env: QWENRUN_API_KEY
    monkeypatch.setattr(cli, "make_agent", lambda spec: Agent(spec, ScriptedEngine([]), tools=[]))
    result = CliRunner().invoke(
        cli_main, ["up", str(agent_file), "--set", f"frontend.api_key_env=${{{SECRET_ENV}}}"]
    )
    assert result.exit_code == 2 and SECRET not in result.output
    assert "must be the name of the environment variable that holds the key" in result.output


# -- request limits --------------------------------------------------------------------------------


async def test_request_size_and_max_tokens_caps() -> None:
    engine = ScriptedEngine(lambda request: "ok")
    spec = spec_of({"max_request_bytes": 2_000, "max_tokens_cap": 64}, sampling={"max_tokens": 4096})
    assert OpenAIFrontend.model_validate({"kind": "openai"}).max_request_bytes == 1_000_000  # the default
    async with serving(create_app(Agent(spec, engine, tools=[]))) as client:
        big = {"model": SERVED, "messages": [{"role": "user", "content": "x" * 2_000}]}
        response = await client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the server counts what it reads
            for _ in range(21):  # just over the limit: all of it is sent before the 413 comes
                yield b" " * 100

        json_type = {"Content-Type": "application/json"}
        response = await client.post("/v1/chat/completions", content=chunks(), headers=json_type)
        assert response.status_code == 413
        for model in (SERVED, AGENT_NAME):
            for asked in (None, 10**9, 2**63 - 1, 32):
                body: dict[str, Any] = {"model": model, "messages": USER}
                if asked is not None:
                    body["max_tokens"] = asked
                assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        for field, value in (
            ("max_tokens", 0),
            ("max_completion_tokens", -1),
            ("seed", 2**63),
            ("seed", -(2**63) - 1),
        ):
            response = await client.post(
                "/v1/chat/completions", json={"model": SERVED, "messages": USER, field: value}
            )
            assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert [call.overrides["max_tokens"] for call in engine.calls] == [64, 64, 64, 32] * 2


# -- the template sandbox -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{ ''.__class__ }}", "access to attribute '__class__' of 'str' object is unsafe."),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "access to attribute '__class__' of 'str' object is unsafe."),
        ("{{ cycler.__init__.__globals__ }}", "access to attribute '__init__' of 'type' object is unsafe."),
        ("{{ joiner.__init__.__globals__.os }}", "access to attribute '__init__' of 'type' object is unsafe."),
        ("{{ namespace.__init__.__globals__ }}", "access to attribute '__init__' of 'type' object is unsafe."),
        ("{{ lipsum.__globals__['os'].system('id') }}", "access to attribute '__globals__' of 'function' object is unsafe."),
        ("{{ self._TemplateReference__context }}",
         "access to attribute '_TemplateReference__context' of 'TemplateReference' object is unsafe."),
        ("{{ self.__init__.__globals__ }}", "access to attribute '__init__' of 'TemplateReference' object is unsafe."),
        ("{{ '{0.__class__}'.format('') }}", "access to attribute '__class__' of 'str' object is unsafe."),
        ("{% set log = [] %}{{ log.append('x') }}", "access to attribute 'append' of 'list' object is unsafe."),
        ("{{ range.__call__ }}", "access to attribute '__call__' of 'function' object is unsafe."),
        ("{{ config.items() }}", "'config' is undefined"),
        ("{{ request.environ }}", "'request' is undefined"),
    ],
)  # fmt: skip
def test_the_system_prompt_template_is_sandboxed(template: str, problem: str, tmp_path: Path) -> None:
    text = yaml.safe_dump({"model": {"path": "m"}, "agent": {"system_prompt": template}})
    assert error_of(text) == f"agent.yaml: agent.system_prompt: {problem}"
    agent_file = tmp_path / "template.yaml"
    agent_file.write_text(text)
    result = CliRunner().invoke(cli_main, ["validate", str(agent_file)])
    assert result.exit_code == 2 and result.output == f"Error: {agent_file}: agent.system_prompt: {problem}\n"


# -- YAML is data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("!!python/object/apply:os.system ['touch {marker}']", "python/object/apply:os.system"),
        ("!!python/object/new:subprocess.Popen [['touch', '{marker}']]", "python/object/new:subprocess.Popen"),
        ("!!python/name:os.system ''", "python/name:os.system"),
        ("!!python/module:os ''", "python/module:os"),
        ("!!python/object:qwenrun.spec.agent_file.AgentSpec {{}}", "python/object:qwenrun.spec.agent_file.AgentSpec"),
        ("!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {marker}']", "python/object/apply:os.system"),
    ],
)  # fmt: skip
def test_yaml_never_constructs_python_objects(value: str, tag: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    message = error_of(f"model:\n  path: {value.format(marker=marker)}\n")
    assert message == (
        "agent.yaml: YAML syntax error at line 2, column 9: "
        f"could not determine a constructor for the tag 'tag:yaml.org,2002:{tag}'"
    )
    with pytest.raises(ConfigError, match="could not determine a constructor"):  # nor through --set
        AgentSpec.from_text("model: {path: m}\n", overrides=[f"model.path={value.format(marker=marker)}"])
    documents = (
        f"%TAG !p! tag:yaml.org,2002:python/\n---\nmodel: !p!object/apply:os.system ['touch {marker}']\n"
    )
    assert "could not determine a constructor" in error_of(documents)
    assert not marker.exists()


# -- code comes only from installed entry points -------------------------------------------------------


@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable module that leaves a marker file when imported."""
    marker = tmp_path / "imported"
    (tmp_path / "qwenrun_probe_module.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\ndef run() -> str:\n    return 'ran'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("qwenrun_probe_module", None)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("os:system", "tools[0].name: String should match pattern '^[A-Za-z_][A-Za-z0-9_.\\-]*$'"),
        ("qwenrun_probe_module:run", "tools[0].name: String should match pattern '^[A-Za-z_][A-Za-z0-9_.\\-]*$'"),
        ("qwenrun_weather:get_current_weather", "tools[0].name: String should match pattern '^[A-Za-z_][A-Za-z0-9_.\\-]*$'"),
        ("os.system", "tools[0].name: unknown tool 'os.system'"),
        ("qwenrun_probe_module.run", "tools[0].name: unknown tool 'qwenrun_probe_module.run'"),
        ("qwenrun_probe_module", "tools[0].name: unknown tool 'qwenrun_probe_module'"),
        ("builtins.eval", "tools[0].name: unknown tool 'builtins.eval'"),
    ],
)  # fmt: skip
def test_tools_are_only_installed_entry_points(
    name: str, problem: str, probe_module: Path, tmp_path: Path
) -> None:
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text(yaml.safe_dump({"model": {"path": "m"}, "tools": [name]}))
    result = CliRunner().invoke(cli_main, ["validate", str(agent_file)])
    assert result.exit_code == 2 and result.output.startswith(f"Error: {agent_file}: {problem}")
    with contextlib.suppress(ConfigError):  # the pattern fails already here
        spec = AgentSpec.from_file(agent_file)
        with pytest.raises(ConfigError, match="unknown tool"):
            Agent(spec, ScriptedEngine([]), strict_plugins=False)  # loading tools for real
    assert not probe_module.exists() and "qwenrun_probe_module" not in sys.modules


# -- secrets ------------------------------------------------------------------------------------------

SECRET_PLACES: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("a tool setting", lambda d: d["tools"][0]["settings"].update(forecast_url="https://x.example/?key=${QWENRUN_TEST_SECRET}")),
    ("engine.env", lambda d: d["engine"].setdefault("env", {}).update(HF_TOKEN="${QWENRUN_TEST_SECRET}")),
    ("engine.extra", lambda d: d["engine"].setdefault("extra", {}).update(hf_token="${QWENRUN_TEST_SECRET}")),
    ("model.revision", lambda d: d["model"].update(revision="${QWENRUN_TEST_SECRET}")),
    ("an unused variable", lambda d: d["agent"].setdefault("variables", {}).update(key="${QWENRUN_TEST_SECRET}")),
]  # fmt: skip
BREAKAGES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("nothing", lambda d: None, ""),
    ("another field", lambda d: d["engine"].update(max_num_seqs=0), "engine.max_num_seqs: Input should be greater than 0"),
    ("a bad tool setting", lambda d: d["tools"][0]["settings"].update(timeout_s="${QWENRUN_TEST_SECRET}"),
     "tools[0].settings.timeout_s: Input should be a valid number, unable to parse string as a number"),
    ("a bad number", lambda d: d["engine"].update(max_num_seqs="${QWENRUN_TEST_SECRET}"),
     "engine.max_num_seqs: Input should be a valid integer, unable to parse string as an integer"),
    ("a bad choice", lambda d: d["engine"].update(dtype="${QWENRUN_TEST_SECRET}"),
     "engine.dtype: Input should be 'auto', 'half', 'float16', 'bfloat16', 'float' or 'float32'"),
    ("a bad pattern", lambda d: d["agent"].update(name="${QWENRUN_TEST_SECRET}!"),
     "agent.name: String should match pattern '^[A-Za-z0-9_.:\\-]+$'"),
]  # fmt: skip


@pytest.mark.parametrize(("place", "put"), SECRET_PLACES, ids=[place for place, _ in SECRET_PLACES])
@pytest.mark.parametrize(("breakage", "breaks", "problem"), BREAKAGES, ids=[b for b, _, _ in BREAKAGES])
def test_secrets_stay_out_of_validate_output_and_logs(
    place: str, put: Callable[[dict[str, Any]], None], breakage: str, breaks: Callable[[dict[str, Any]], None],
    problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setenv(SECRET_ENV, SECRET)
    document = yaml.safe_load((ROOT / "agents" / "weather.yaml").read_text())
    put(document)
    breaks(document)
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text(yaml.safe_dump(document, allow_unicode=True))
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(cli_main, ["-vv", "validate", str(agent_file)])
    if problem:
        assert result.exit_code == 2 and result.output == f"Error: {agent_file}: {problem}\n"
    else:
        assert result.exit_code == 0, result.output
        assert result.output == f"{agent_file}: ok (weather, 1 tools, frontend cli)\n"
    assert SECRET not in result.output and SECRET not in caplog.text


async def test_the_server_never_logs_a_secret_of_the_agent_file(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Secrets interpolated into the spec (tool settings, engine env) are not in the server's logs."""
    monkeypatch.setenv(SECRET_ENV, SECRET)

    def weather(city: str) -> str:
        """Weather."""
        return "sunny"

    spec = spec_of(
        {"api_key_env": SECRET_ENV},
        engine={"env": {"HF_TOKEN": f"${{{SECRET_ENV}}}"}},
        agent={"name": AGENT_NAME, "variables": {"token": f"${{{SECRET_ENV}}}"}},
    )
    assert spec.engine.env["HF_TOKEN"] == SECRET

    def script(request: ModelRequest) -> str:
        if request.messages[-1]["content"] == "fail":
            raise RuntimeError("a bug in the engine")
        return "ok"

    caplog.set_level(logging.DEBUG)
    app = create_app(Agent(spec, ScriptedEngine(script), tools=[weather]))
    async with serving(app, log_config=None, log_level="debug", access_log=True) as client:
        headers = {"Authorization": f"Bearer {SECRET}"}
        for content in ("hi", "fail"):
            for model in (SERVED, AGENT_NAME):
                body = {"model": model, "messages": [{"role": "user", "content": content}]}
                await client.post("/v1/chat/completions", json=body, headers=headers)
        assert (await client.get("/metrics", headers=headers)).status_code == 200
    assert "a bug in the engine" in caplog.text  # the internal errors were logged ...
    assert SECRET not in caplog.text  # ... without the secret
