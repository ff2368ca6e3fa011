"""The plugin's settings (the A2A calls themselves are tested end to end in qwenrun's
tests/test_a2a_pair.py, against a real qwenrun A2A server)."""

import pytest
from pydantic import ValidationError
from qwenrun_a2a import AgentError, AgentSettings, ask_agent


def test_settings_need_an_http_url_and_forbid_unknown_keys() -> None:
    assert AgentSettings().url == "http://127.0.0.1:8000/"
    with pytest.raises(ValidationError, match="String should match pattern"):
        AgentSettings(url="ftp://example.com/")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AgentSettings.model_validate({"adress": "http://127.0.0.1:8000/"})


async def test_a_missing_api_key_is_an_error_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWENRUN_A2A_TEST_KEY", raising=False)
    settings = AgentSettings(url="http://127.0.0.1:9/", api_key_env="QWENRUN_A2A_TEST_KEY")
    message = r"the API key of the agent at http://127.0.0.1:9/ is not set \(\$QWENRUN_A2A_TEST_KEY\)"
    with pytest.raises(AgentError, match=message):
        await ask_agent("hi", settings=settings)


async def test_an_agent_that_cannot_be_reached_is_an_error_for_the_model() -> None:
    settings = AgentSettings(url="http://127.0.0.1:9/", timeout_s=5)  # port 9 (discard): nothing listens
    with pytest.raises(AgentError, match=r"^cannot reach the agent at http://127.0.0.1:9/: "):
        await ask_agent("hi", settings=settings)
