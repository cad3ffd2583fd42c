"""ondevice's own tools (served over MCP by ``ondevice agent --serve-mcp``) and loading user tools.

User tools come from a module or a ``.py`` file: its ``TOOLS`` list (functions or :class:`Tool` objects),
a named attribute (``file.py:attr``), or else every :class:`Tool` defined at its top level. Only what is
loaded this way is registered; nothing else can be called.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import InvalidArgument
from .tools import Tool, Toolbox, tool


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
        model: a name from list_models (default: the embedded default model).
        max_tokens: the most tokens to generate.
    """
    from ..engine import load

    names = [m["name"] for m in list_models()]
    if model is not None and model not in names:  # never a path: a caller (an MCP client) must not probe files
        raise ValueError(f"unknown model {model!r}; use one of {', '.join(names)}")
    m = load(model, n_ctx=2048)
    try:
        r = m.generate(prompt, temp=0.0, max_tokens=max(1, min(int(max_tokens), 1024)))
    finally:
        m.close()
    return {"text": r.text, "finish_reason": r.finish_reason, "tokens": len(r.tokens)}


def builtin_toolbox() -> Toolbox:
    # the two that only read are said so (an MCP client may run them without asking); generate loads a model
    return Toolbox([tool(list_models, read_only=True), tool(device_info, read_only=True), generate])


def _user_line(e: BaseException) -> str:
    """`` (FILE, line N)`` of the innermost frame of ``e`` outside ondevice and the import machinery, or ''."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "importlib" not in f.filename and Path(__file__).parent.parent.as_posix() not in f.filename]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def load_tools(spec: str) -> list[Tool]:
    """Tools from ``module``, ``module:attr``, ``path/file.py`` or ``path/file.py:attr``."""
    target, _, attr = spec.partition(":") if not (len(spec) > 1 and spec[1] == ":") else (spec, "", "")
    if Path(target).is_dir() and (Path(target) / "__init__.py").is_file():  # a package folder: its __init__.py
        target = str(Path(target) / "__init__.py")
    elif not target.endswith(".py") and ("/" in target or target.startswith(".")):  # a path, not a module name
        hint = f"; did you mean {target}.py?" if Path(target + ".py").is_file() else ""
        raise InvalidArgument(f"--tools {spec}: give a .py file, a package folder or a module name (mytools, "
                              f"pkg.tools){hint}")
    elif not target:
        raise InvalidArgument("--tools needs a .py file, a package folder or a module name")
    is_file = target.endswith(".py")
    if is_file and not Path(target).is_file():
        raise InvalidArgument(f"--tools {spec}: no file at {target}")
    try:
        if is_file:
            pkg = Path(target).name == "__init__.py"  # a package folder: its own modules import relatively
            mod_spec = importlib.util.spec_from_file_location(
                f"ondevice_user_tools_{Path(target).parent.name if pkg else Path(target).stem}", target,
                submodule_search_locations=[str(Path(target).parent)] if pkg else None)
            mod = importlib.util.module_from_spec(mod_spec)
            # in sys.modules, as an import puts it: pydantic resolves a dataclass's string annotations (from
            # __future__ import annotations) through its module there
            sys.modules[mod_spec.name] = mod
            folder = str(Path(target).resolve().parent)
            sys.path.insert(0, folder)  # its own folder first, as `python file.py` runs it: it imports its neighbours
            try:
                mod_spec.loader.exec_module(mod)
            finally:
                with contextlib.suppress(ValueError):
                    sys.path.remove(folder)
        else:
            mod = importlib.import_module(target)
    except SyntaxError as e:  # the user's code does not parse: where and why, not our traceback
        raise InvalidArgument(f"--tools {spec}: {e.filename}, line {e.lineno}: {e.msg}; fix the file") from None
    except ImportError as e:
        if not is_file and (target + ".").startswith(f"{e.name}."):  # the module itself, not its imports
            raise InvalidArgument(f"--tools {spec}: cannot import {target} ({e}); give a module or a .py file") \
                from None
        raise InvalidArgument(f"--tools {spec}: importing {target} failed: {e}{_user_line(e)}; fix its imports") \
            from None
    except InvalidArgument as e:  # a @tool ondevice cannot offer (an untyped parameter ...): where it is defined
        raise InvalidArgument(f"--tools {spec}: {e}{_user_line(e)}") from None
    except SystemExit as e:  # sys.exit() at import would end ondevice with its code and no word
        code = "" if e.code is None else repr(e.code)
        raise InvalidArgument(f"--tools {spec}: importing {target} called sys.exit({code}){_user_line(e)}; a "
                              f"tools module must not exit when imported: fix the module") from None
    except Exception as e:  # noqa: BLE001 — any error the user's module raises while it is imported
        raise InvalidArgument(f"--tools {spec}: importing {target} raised {type(e).__name__}: {e}{_user_line(e)}; "
                              f"fix the module") from None
    if attr:
        if not hasattr(mod, attr):
            raise InvalidArgument(f"--tools {spec}: {target} has no {attr!r}")
        found = getattr(mod, attr)
    elif hasattr(mod, "TOOLS"):
        found = mod.TOOLS
    else:  # @tool functions, and the tools of a Toolbox its @box.tool filled (their sensitive flags kept)
        found = [t for v in vars(mod).values() for t in ([v] if isinstance(v, Tool) else
                                                          list(v) if isinstance(v, Toolbox) else [])]
    items = list(found) if isinstance(found, (list, tuple, Toolbox)) else [found]
    try:
        tools = [t if isinstance(t, Tool) else Tool.from_function(t) for t in items]
    except InvalidArgument as e:
        raise InvalidArgument(f"--tools {spec}: {e}") from None
    if not tools:
        raise InvalidArgument(f"--tools {spec}: no tools found; define TOOLS = [...] or decorate functions "
                              "with ondevice.agent.tool")
    return tools
