"""Tools: typed Python functions (or MCP tools) with a JSON schema, validated before every call.

A function's signature, type hints and Google-style docstring become the tool's JSON schema (through a
pydantic model built from the signature); the same model validates and coerces the arguments a model
wrote before the function runs, so a bad call is an error message fed back to the model, never a crash.
:class:`Toolbox` is the only door through which a tool runs: a call names a registered tool and gets
exactly the callable that was registered under that name (no tool runs code it was not registered with),
and a ``sensitive`` tool runs only after a confirmation (MobileAgent's human confirmation) — through one
lock, so parallel branches ask one at a time.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument, OndeviceError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's function-name rule (the server applies it too)

Confirm = Callable[["Tool", dict], bool]  # (tool, validated arguments) -> run it?


class ToolError(OndeviceError):
    """A call that could not run: unknown tool, invalid arguments, refused confirmation or a failure inside."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind  # unknown | invalid | unconfirmed | failed | timeout | schema | gone


def _pydantic():
    try:
        import pydantic
    except ModuleNotFoundError:
        raise OndeviceError("agents need pydantic; install the agent extra: pip install 'ondevice[agent]'") from None
    return pydantic


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The description (text before ``Args:``) and per-argument descriptions of a Google-style docstring."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    desc, args, cur, section = [], {}, None, None
    for line in lines:
        head = line.strip().rstrip(":").lower()
        if line.strip().endswith(":") and head in ("args", "arguments", "parameters", "returns", "raises", "yields",
                                                   "example", "examples", "note", "notes"):
            section, cur = head, None
            continue
        if section is None:
            desc.append(line)
        elif section in ("args", "arguments", "parameters"):
            m = re.match(r"^\s{0,8}(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if m and (len(line) - len(line.lstrip())) <= 8 and not line.startswith(" " * 9):
                cur = m.group(1).lstrip("*")
                args[cur] = m.group(2).strip()
            elif cur and line.strip():
                args[cur] = f"{args[cur]} {line.strip()}".strip()
    return " ".join(x.strip() for x in desc if x.strip()), args


def clean_schema(schema: Any) -> Any:
    """A pydantic JSON schema without ``title`` keys (noise in a small model's prompt); property names kept."""
    if isinstance(schema, list):
        return [clean_schema(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "title" and isinstance(v, str):
            continue
        if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
            out[k] = {name: clean_schema(sub) for name, sub in v.items()}
        else:
            out[k] = clean_schema(v)
    return out


@dataclass
class Tool:
    """One callable tool: its name, description, JSON schema of parameters, and the code that runs it."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]
    sensitive: bool = False
    output_schema: dict | None = None  # the JSON schema of what it returns (typed outputs feed later steps)
    source: str = "python"  # python | mcp:<server>
    read_only: bool = False  # changes nothing outside (MCP's readOnlyHint: a client may run it without asking)
    args_model: Any = field(default=None, repr=False)  # pydantic model of the parameters (Python tools)
    returns: Any = field(default=None, repr=False)  # pydantic TypeAdapter of the return type

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InvalidArgument(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'; rename it")
        if self.parameters.get("type") != "object":
            raise InvalidArgument(f"tool {self.name}: parameters must be a JSON schema with type 'object'")

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
                      sensitive: bool = False, read_only: bool = False) -> Tool:
        """A tool from a typed function: parameters from its signature and hints, descriptions from its
        docstring, output schema from its return annotation. ``read_only``: it changes nothing outside itself
        (said to MCP clients as ``readOnlyHint``)."""
        pd = _pydantic()
        if not callable(fn):
            raise InvalidArgument(f"{fn!r} is not callable; register a function")
        inner = getattr(fn, "func", None)  # a functools.partial: named after its function, its bound args dropped
        name = name or getattr(fn, "__name__", None) or getattr(inner, "__name__", None)
        if not name:
            raise InvalidArgument(f"{fn!r} has no name; register a function, or give one: "
                                  f"Tool.from_function(fn, name=...)")
        documented = inner if inner is not None else fn  # its docstring and type hints
        summary, arg_docs = parse_docstring(inspect.getdoc(documented))
        try:
            hints = typing.get_type_hints(documented, include_extras=True)
        except Exception as e:  # unresolvable forward references
            raise InvalidArgument(f"tool {name}: its type hints cannot be resolved ({e}); import the types "
                                  "it names at module level") from e
        fields: dict[str, Any] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                stars = "*" if p.kind is p.VAR_POSITIONAL else "**"
                raise InvalidArgument(f"tool {name}: {stars}{p.name} cannot be described by a schema; "
                                      "give the function named parameters")
            if p.name not in hints:  # an Any schema lets a model pass anything at all (it does: {"default": 3})
                like = type(p.default).__name__ if type(p.default) in (str, int, float, bool) else "str"
                raise InvalidArgument(f"tool {name}: parameter {p.name} has no type hint, so no model can be told "
                                      f"what to pass; annotate it (e.g. {p.name}: {like})")
            ann = hints[p.name]
            try:
                pd.TypeAdapter(ann).json_schema()
            except Exception:  # noqa: BLE001 — pydantic's schema errors are several classes and pages of text
                raise InvalidArgument(f"tool {name}: parameter {p.name} has type {_type_name(ann)}, which has no "
                                      "JSON schema; use str, int, float, bool, Literal[...], an Enum, a list or dict "
                                      "of those, a dataclass or a pydantic model") from None
            default = ... if p.default is p.empty else p.default
            fields[p.name] = (ann, pd.Field(default, description=arg_docs.get(p.name) or None))
        model = pd.create_model(f"{name}_arguments", __config__=pd.ConfigDict(extra="forbid"), **fields)
        params = clean_schema(model.model_json_schema())
        params.setdefault("properties", {})
        ret = hints.get("return", inspect.Signature.empty)
        returns = out_schema = None
        if ret not in (inspect.Signature.empty, None, type(None)):
            returns = pd.TypeAdapter(ret)
            try:
                out_schema = clean_schema(returns.json_schema())
            except Exception:  # a return type without a JSON schema: results are still JSON-encoded
                out_schema = None
        return cls(name=name, description=description or summary, parameters=params, fn=fn, sensitive=sensitive,
                   read_only=read_only, output_schema=out_schema, args_model=model, returns=returns)

    def spec(self) -> dict:
        """The OpenAI function object (``name``, ``description``, ``parameters``)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def validate(self, args: Any) -> dict:
        """Arguments checked (and coerced) against the schema; :class:`ToolError` names what is wrong."""
        if not isinstance(args, dict):
            raise ToolError(f"{self.name}: arguments must be a JSON object, got {type(args).__name__}", "invalid")
        if self.args_model is not None:
            pd = _pydantic()
            try:
                m = self.args_model.model_validate(args)
            except pd.ValidationError as e:
                raise ToolError(f"{self.name}: invalid arguments: {_brief(e)}", "invalid") from None
            return {k: getattr(m, k) for k in type(m).model_fields}
        return validate_json(self.name, self.parameters, args)

    def args_json(self, valid: dict) -> dict:
        """Validated arguments as JSON data, as a model writes them: a pydantic model or dataclass argument as
        its fields (``{"city": "Oslo"}``), not its repr (what the log records and the model is shown again)."""
        if self.args_model is not None:
            try:
                return self.args_model.model_construct(**valid).model_dump(mode="json", warnings=False)
            except Exception:  # noqa: BLE001 — a value pydantic cannot dump
                return _jsonable(valid)
        return _jsonable(valid)

    def to_json(self, value: Any) -> Any:
        """A result as JSON-able data (through the return type when there is one)."""
        if self.returns is not None:
            try:
                return self.returns.dump_python(value, mode="json")
            except Exception:
                pass
        try:
            json.dumps(value)
            return value
        except (TypeError, ValueError):
            return repr(value)


def _type_name(ann: Any) -> str:
    if isinstance(ann, type):
        return ann.__qualname__ if ann.__module__ == "builtins" else f"{ann.__module__}.{ann.__qualname__}"
    if typing.get_origin(ann) is None and getattr(ann, "__qualname__", None):
        return ann.__qualname__
    return repr(ann).replace("typing.", "").replace("collections.abc.", "")


def _brief(e, whole: str = "(arguments)") -> str:
    """A pydantic ValidationError in one line: ``field: problem; ...`` (``whole``: the label of an error in the
    value itself, with no field)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or whole
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def validate_json(name: str, schema: dict, args: dict) -> dict:
    """Arguments checked against a JSON schema (tools known only by schema, e.g. from an MCP server)."""
    try:
        import jsonschema
    except ModuleNotFoundError:
        raise OndeviceError("schema-only tools need jsonschema; install the agent extra: "
                            "pip install 'ondevice[agent]'") from None
    # the draft the schema names ($schema: draft-07 is what zod-to-json-schema, so most TypeScript MCP servers,
    # send: tuple "items" lists), else 2020-12
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        errors = sorted(cls(schema).iter_errors(args), key=lambda e: list(e.path))
    except Exception as e:  # noqa: BLE001 — a schema the validator cannot read: the call is refused, not a crash
        raise ToolError(f"{name}: its input schema cannot be checked ({type(e).__name__}: {e}); the call did not "
                        f"run", "invalid") from None
    if errors:
        msg = "; ".join(f"{'.'.join(map(str, e.path)) or '(arguments)'}: {e.message}" for e in errors[:5])
        raise ToolError(f"{name}: invalid arguments: {msg}", "invalid")
    return args


@dataclass(frozen=True)
class ToolResult:
    """What a call did: the validated arguments, its value or error, and when it ran."""

    name: str
    args: dict
    ok: bool
    value: Any = None
    error: str | None = None
    # ok | unknown | invalid | unconfirmed | failed; not retried: timeout (may still run), schema (the tool's schema
    # is unusable) and gone (its MCP server exited)
    kind: str = "ok"
    started: float = 0.0  # time.perf_counter() at the start of the call
    seconds: float = 0.0

    def message(self) -> str:
        """The result as the text a model reads next."""
        if self.ok:
            return result_text(self.value)
        return f"error ({self.kind}): {self.error}"


def result_text(value: Any) -> str:
    """A tool's value as the text a model (or an MCP client) reads: a string as itself (a file's lines stay
    lines, not one JSON string of ``\\n``s, as LangGraph's ToolNode and the MCP SDK's server send it), else JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def tool(fn: Callable | None = None, *, name: str | None = None, sensitive: bool = False, read_only: bool = False):
    """Decorator: ``@tool``, ``@tool(sensitive=True)`` or ``@tool(read_only=True)`` turns a typed function into a
    :class:`Tool`."""
    if fn is None:
        return lambda f: Tool.from_function(f, name=name, sensitive=sensitive, read_only=read_only)
    return Tool.from_function(fn, name=name, sensitive=sensitive, read_only=read_only)


class Toolbox:
    """The registered tools and the one way to run them (validate, confirm if sensitive, call, time)."""

    def __init__(self, tools: Iterable[Tool | Callable] = (), *, confirm: Confirm | None = None):
        self.tools: dict[str, Tool] = {}
        self.confirm = confirm
        self.no_one_to_ask = ""  # what a refusal adds when there is no confirmer (how to allow the tools)
        self._confirm_lock = threading.Lock()  # confirmations one at a time, whatever runs in parallel
        for t in tools:
            self.add(t)

    def add(self, t: Tool | Callable, *, sensitive: bool | None = None) -> Tool:
        tool_ = t if isinstance(t, Tool) else Tool.from_function(t, sensitive=bool(sensitive))
        if sensitive is not None and isinstance(t, Tool):
            tool_.sensitive = sensitive
        if tool_.name in self.tools and self.tools[tool_.name] is not tool_:
            raise InvalidArgument(f"a tool named {tool_.name!r} is already registered; give one a different name")
        self.tools[tool_.name] = tool_
        return tool_

    def tool(self, fn: Callable | None = None, *, name: str | None = None, sensitive: bool = False,
             read_only: bool = False):
        """Decorator registering a function: ``@box.tool``, ``@box.tool(sensitive=True)`` or
        ``@box.tool(read_only=True)``."""
        def register(f: Callable) -> Callable:
            self.add(Tool.from_function(f, name=name, sensitive=sensitive, read_only=read_only))
            return f
        return register(fn) if fn is not None else register

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __iter__(self):
        return iter(self.tools.values())

    def __len__(self) -> int:
        return len(self.tools)

    def get(self, name: str) -> Tool:
        try:
            return self.tools[name]
        except KeyError:
            raise ToolError(f"no tool named {name!r}; the tools are {', '.join(self.tools) or '(none)'}",
                            "unknown") from None

    def subset(self, names: Iterable[str]) -> list[Tool]:
        return [self.get(n) for n in names]

    def _confirmed(self, t: Tool, args: dict, confirm: Confirm | None) -> bool:
        ask = confirm or self.confirm
        if ask is None:
            return False  # no one to ask: a sensitive tool does not run
        with self._confirm_lock:
            try:
                return bool(ask(t, args))
            except Exception:  # a confirmer that breaks has not said yes
                return False

    def call(self, name: str, args: Any, *, confirm: Confirm | None = None) -> ToolResult:
        """Run a registered tool; every failure becomes a ``ToolResult`` with ``ok=False`` and a message."""
        t0 = time.perf_counter()
        try:
            t = self.get(name)
            valid = t.validate(args if args is not None else {})
            if t.sensitive and not self._confirmed(t, valid, confirm):
                hint = f" ({self.no_one_to_ask})" if self.no_one_to_ask and not (confirm or self.confirm) else ""
                raise ToolError(f"{name} is sensitive and was not confirmed; it did not run{hint}", "unconfirmed")
            try:
                value = t.fn(**valid)
                if inspect.isawaitable(value):  # an async def tool
                    value = _await(value)
            except ToolError:
                raise
            except (Exception, SystemExit) as e:  # the tool's own failure is data for the model (reflection),
                # not a crash; a tool that calls exit() too must not take an agent or an MCP server down with it
                raise ToolError(f"{name} failed: {type(e).__name__}: {e}", "failed") from e
            if t.returns is not None:  # what it returns is what its annotation (and output schema) says
                try:
                    value = t.returns.validate_python(value)
                except _pydantic().ValidationError as e:
                    raise ToolError(f"{name} returned {type(value).__name__} {_short(value)}, which is not what "
                                    f"its return annotation says: {_brief(e, 'the value')}", "failed") from None
            return ToolResult(name, t.args_json(valid), True, t.to_json(value), started=t0,
                              seconds=time.perf_counter() - t0)
        except ToolError as e:
            return ToolResult(name, args if isinstance(args, dict) else {"_": args}, False, error=str(e),
                              kind=e.kind, started=t0, seconds=time.perf_counter() - t0)


def _await(awaitable) -> Any:
    """The result of an async tool, run on one event loop that lives as long as the process (a thread of its
    own), as an MCP SDK server runs its tools: what a tool keeps between calls (an httpx.AsyncClient, a pool, a
    worker task) stays bound to a loop that is still running. A new loop per call broke every call after the
    first ("Event loop is closed")."""
    import asyncio

    async def run():
        return await awaitable

    return asyncio.run_coroutine_threadsafe(run(), _tool_loop()).result()


_LOOP: list = []  # the async tools' event loop, started on first use
_LOOP_LOCK = threading.Lock()


def _tool_loop():
    import asyncio

    with _LOOP_LOCK:
        if not _LOOP:
            import atexit

            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="ondevice-async-tools", daemon=True)
            thread.start()
            _LOOP.append(loop)

            def stop() -> None:  # at exit: the tools' tasks cancelled and let end, not "destroyed but pending"
                def cancel() -> None:
                    for task in asyncio.all_tasks(loop):
                        task.cancel()
                    loop.call_soon(loop.stop)

                loop.call_soon_threadsafe(cancel)
                thread.join(2)

            atexit.register(stop)
        return _LOOP[0]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(args: dict) -> dict:
    try:
        json.dumps(args)
        return args
    except (TypeError, ValueError):
        return json.loads(json.dumps(args, default=str))
