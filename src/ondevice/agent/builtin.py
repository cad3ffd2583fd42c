"""ondevice's own tools (served over MCP by ``ondevice agent --serve-mcp``) and loading user tools.

User tools come from a module or a ``.py`` file: its ``TOOLS`` list (functions or :class:`Tool` objects),
a named attribute (``file.py:attr``), or else every :class:`Tool` defined at its top level. Only what is
loaded this way is registered; nothing else can be called.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..errors import InvalidArgument
from .tools import Tool, Toolbox


def list_models() -> list[dict]:
    """The models ondevice knows here: name, whether the file is available, and what it is."""
    from ..models.catalog import list_models as _list

    return [{"name": m.name, "available": m.available, "status": m.status, "description": m.description}
            for m in _list()]


def device_info() -> dict:
    """This machine: CPU model, physical cores, total memory and CPU flags relevant to llama.cpp."""
    from ..device import info

    flags = [f for f in info.cpu_flags() if f in ("avx", "avx2", "avx512f", "fma", "f16c", "neon", "amx_tile")]
    return {"cpu": info.cpu_model(), "physical_cores": info.physical_cores(),
            "memory_bytes": info.total_memory_bytes(), "flags": flags}


def generate(prompt: str, model: str | None = None, max_tokens: int = 128) -> dict:
    """Generate a reply to a prompt with a local model (greedy).

    Args:
        prompt: what to ask the model.
        model: a catalog name or .gguf path (default: the embedded default model).
        max_tokens: the most tokens to generate.
    """
    from ..engine import load

    m = load(model, n_ctx=2048)
    try:
        r = m.generate(prompt, temp=0.0, max_tokens=max(1, min(int(max_tokens), 1024)))
    finally:
        m.close()
    return {"text": r.text, "finish_reason": r.finish_reason, "tokens": len(r.tokens)}


def builtin_toolbox() -> Toolbox:
    return Toolbox([list_models, device_info, generate])


def load_tools(spec: str) -> list[Tool]:
    """Tools from ``module``, ``module:attr``, ``path/file.py`` or ``path/file.py:attr``."""
    target, _, attr = spec.partition(":") if not (len(spec) > 1 and spec[1] == ":") else (spec, "", "")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InvalidArgument(f"--tools {spec}: no file at {path}")
        mod_spec = importlib.util.spec_from_file_location(f"ondevice_user_tools_{path.stem}", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as e:
            raise InvalidArgument(f"--tools {spec}: cannot import {target} ({e}); give a module or a .py file") \
                from None
    if attr:
        if not hasattr(mod, attr):
            raise InvalidArgument(f"--tools {spec}: {target} has no {attr!r}")
        found = getattr(mod, attr)
    elif hasattr(mod, "TOOLS"):
        found = mod.TOOLS
    else:
        found = [v for v in vars(mod).values() if isinstance(v, Tool)]
    items = found if isinstance(found, (list, tuple)) else [found]
    tools = [t if isinstance(t, Tool) else Tool.from_function(t) for t in items]
    if not tools:
        raise InvalidArgument(f"--tools {spec}: no tools found; define TOOLS = [...] or decorate functions "
                              "with ondevice.agent.tool")
    return tools
