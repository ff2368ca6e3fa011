"""The agent card of the A2A front end: who the agent is, where and how to reach it, what it can do.

Served at ``/.well-known/agent-card.json`` (without the API key: a client reads it to learn that
it needs one). Its skills are the agent's tools, one each (MCP tools too, once their servers have
started); an agent without tools has one skill, itself. With ``frontend.api_key_env`` the card
names one security scheme, ``bearer`` (HTTP ``Authorization: Bearer <key>``), and requires it.
The card offers one JSON-RPC endpoint in both protocol versions the library serves (1.0 and 0.3).
"""

from __future__ import annotations

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_0_3, PROTOCOL_VERSION_1_0, TransportProtocol

from qwenrun.agent import Agent
from qwenrun.tools import Tool
from qwenrun.version import __version__

__all__ = ["agent_card"]

BEARER = "bearer"  # the name of the card's security scheme


def agent_card(agent: Agent, url: str, *, api_key_env: str | None = None) -> AgentCard:
    """The card of ``agent`` served at ``url`` (the JSON-RPC endpoint; it ends with ``/``)."""
    spec = agent.spec
    description = spec.agent.description or f"qwenrun agent {agent.name!r} on {spec.served_model_name}"
    skills = [_skill(tool) for tool in agent.tools.values()] or [
        AgentSkill(id=agent.name, name=agent.name, description=description, tags=["chat"])
    ]
    card = AgentCard(
        name=agent.name,
        description=description,
        version=__version__,
        provider=AgentProvider(organization="qwenrun", url=url),
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding=TransportProtocol.JSONRPC, protocol_version=version)
            for version in (PROTOCOL_VERSION_1_0, PROTOCOL_VERSION_0_3)
        ],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain"],
        skills=skills,
    )
    if api_key_env is not None:
        scheme = HTTPAuthSecurityScheme(scheme="Bearer", description="Authorization: Bearer <the API key>")
        card.security_schemes[BEARER].CopyFrom(SecurityScheme(http_auth_security_scheme=scheme))
        card.security_requirements.append(SecurityRequirement(schemes={BEARER: StringList()}))
    return card


def _skill(tool: Tool) -> AgentSkill:
    tags = ["tool"] if tool.approval == "auto" else ["tool", f"approval:{tool.approval}"]
    description = tool.description or f"the tool {tool.name}"
    return AgentSkill(id=tool.name, name=tool.name, description=description, tags=tags)
