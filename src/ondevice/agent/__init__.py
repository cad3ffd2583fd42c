"""Small-model agents: typed tools, retrieval, planner -> actions, a parallel task graph, MCP.

    >>> from ondevice.agent import Agent, Toolbox, tool
    >>> @tool
    ... def get_weather(city: str) -> dict:
    ...     '''Current weather in a city.'''
    ...     return {"city": city, "temp_c": 18}
    >>> agent = Agent(Toolbox([get_weather]), actor=ondevice.load())
    >>> agent.run("What's the weather in Oslo?").to_dict()

Needs the ``agent`` extra (pydantic for schemas and validation, mcp for MCP): ``pip install 'ondevice[agent]'``.
"""

from __future__ import annotations

from .agent import SOP, Agent, AgentRun, cli_confirm
from .calls import Call, Turn, call_turn
from .graph import GraphRun, Node, run_graph
from .retrieval import Embedder, ToolIndex
from .tools import Tool, Toolbox, ToolError, ToolResult, tool

__all__ = ["SOP", "Agent", "AgentRun", "Call", "Embedder", "GraphRun", "Node", "Tool", "ToolError", "ToolIndex",
           "ToolResult", "Toolbox", "Turn", "call_turn", "cli_confirm", "run_graph", "tool"]
