"""qwenrun tool plugin: ask a remote agent over A2A (another qwenrun agent served with
``frontend.kind: a2a``, or any A2A server), with Google's official A2A SDK (``a2a-sdk``).

One tool, :func:`ask_agent`, registered in the ``qwenrun.tools`` entry-point group. Its
:class:`AgentSettings` (from the agent YAML) name the remote agent's URL, where its card is
(``/.well-known/agent-card.json``), and the environment variable of its API key, if it needs one.
Each call is one message in a new context of the remote agent; the tool answers with the remote
task's answer (its artifacts' text, or its reply message). A remote task that ends otherwise
(failed, rejected, canceled) or asks for input (an approval nobody can give here: the remote task is
canceled) raises :class:`AgentError` with a message meant to be read by the model.
This package does not import qwenrun.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the SDK is imported when the tool runs: listing tools stays fast
    from a2a.client import Client
    from a2a.types import StreamResponse

__all__ = ["AgentError", "AgentSettings", "ask_agent"]
__version__ = "0.1.0"


class AgentError(Exception):
    """The remote agent could not answer; the message says why, in words meant for the model."""


class AgentSettings(BaseModel):
    """Settings of :func:`ask_agent`, from the agent YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(default="http://127.0.0.1:8000/", pattern=r"^https?://")
    api_key_env: str | None = Field(default=None, description="Env variable with the remote agent's API key.")
    timeout_s: float = Field(default=120.0, gt=0, le=3600)


async def ask_agent(
    message: Annotated[str, Field(min_length=1, max_length=20_000)], *, settings: AgentSettings
) -> str:
    """Ask another agent and return its answer.

    Args:
        message: What to ask the other agent, in plain words, with everything it needs to know.
    """
    import httpx
    from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
    from a2a.helpers import new_text_message
    from a2a.types import Role, SendMessageRequest
    from a2a.utils.errors import A2AError

    headers = {}
    if settings.api_key_env is not None:
        key = os.environ.get(settings.api_key_env)
        if not key:
            where = f"${settings.api_key_env}"
            raise AgentError(f"the API key of the agent at {settings.url} is not set ({where})")
        headers["Authorization"] = f"Bearer {key}"
    request = SendMessageRequest(message=new_text_message(message, role=Role.ROLE_USER))
    async with httpx.AsyncClient(headers=headers, timeout=settings.timeout_s) as http:
        try:
            card = await A2ACardResolver(http, settings.url).get_agent_card()
            client = ClientFactory(ClientConfig(streaming=False, httpx_client=http)).create(card)
        except (A2AError, ValueError) as exc:
            raise AgentError(f"cannot reach the agent at {settings.url}: {exc}") from None
        try:
            responses = [response async for response in client.send_message(request)]
            return await _answer(client, responses[-1], card.name or settings.url)
        except A2AError as exc:
            raise AgentError(f"the agent {card.name!r} failed: {type(exc).__name__}: {exc}") from None
        finally:
            await client.close()


async def _answer(client: Client, response: StreamResponse, name: str) -> str:
    from a2a.helpers import get_artifact_text, get_message_text
    from a2a.types import CancelTaskRequest, TaskState

    if response.HasField("message"):
        return get_message_text(response.message)
    task = response.task
    said = get_message_text(task.status.message) if task.status.HasField("message") else ""
    state = task.status.state
    if state == TaskState.TASK_STATE_COMPLETED:
        return "\n".join(get_artifact_text(artifact) for artifact in task.artifacts) or said
    if state in (TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED):
        await client.cancel_task(CancelTaskRequest(id=task.id))
        raise AgentError(f"the agent {name!r} asks for input that nobody can give from here, so its task "
                         f"was canceled; it asked: {said or '(nothing)'}")  # fmt: skip
    shown = TaskState.Name(state).removeprefix("TASK_STATE_").lower().replace("_", "-")
    reason = f" ({said})" if said else ""
    raise AgentError(f"the agent {name!r} did not answer: its task is {shown}{reason}")
