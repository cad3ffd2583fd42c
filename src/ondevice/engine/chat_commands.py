"""Chat's commands (``/set``, ``/show``, ``/save`` ...) and the session they change, as ``ollama run`` has them:
what ``ondevice chat`` (:mod:`ondevice.engine.cli_chat`) applies for a line that starts with ``/``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

from ..errors import InvalidArgument, OndeviceError
from .args import unescape
from .records import MORE_SAMPLERS, UNTIL_END, Sampling

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed (--seed -1)
SHOWN = ("temp", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed",
         "max_tokens")
_DEFAULT = Sampling()
# /set NAME VALUE: every number of Sampling by its name (llama-server's, most of them Ollama's too), and Ollama's
# other names -> (Sampling field, type)
PARAMS: dict[str, tuple[str, type]] = {
    **{name: (name, type(getattr(_DEFAULT, name))) for name in (*SHOWN, *MORE_SAMPLERS)
       if type(getattr(_DEFAULT, name)) in (int, float)},
    "temperature": ("temp", float), "num_predict": ("max_tokens", int),
}
# Ollama's parameters of the model's load: the flag that sets them here
AT_LOAD = {"num_ctx": "-c/--ctx", "num_thread": "-t/--threads", "num_batch": "-b/--batch-size"}
# Ollama's display settings: nothing to change in this chat
DISPLAY_ONLY = ("wordwrap", "nowordwrap", "history", "nohistory")
# Ollama's thinking mode on and off (`ollama run`'s /set think): no model here has one, as the server's 400 for
# think=true says too; off is what there is
THINKING = {"think": "this model has no thinking mode; its answers come without one",
            "nothink": "this model has no thinking mode, so it is off (accepted)"}

HELP = """commands:
  /set temperature 0      change a sampling parameter: temperature, top_p, top_k, min_p, repeat_penalty,
                          presence_penalty, frequency_penalty, seed, max_tokens (num_predict), and each
                          sampler flag of `ondevice chat --help` by its name (repeat_last_n, typical_p, mirostat ...)
  /set stop TEXT ...      stop strings (\\n: a newline); /set stop alone: none
  /set system TEXT        a new system prompt (starts a new conversation); /set system \"\"\" spans lines
  /set verbose | quiet    timings after each answer on or off
  /set format json        answers are JSON objects (/set noformat: as the command line said)
  /show                   the model, its context window, the parameters and the system prompt
                          (/show info, parameters, system, template or license: one of them)
  /load MODEL             talk to another model (a new conversation; the same load flags)
  /save FILE              keep the conversation in a JSON file; /load FILE resumes it (its model too)
  /reset                  start a new conversation (also /clear)
  /bye                    quit (also /exit, /quit, Ctrl-D)
  \"\"\"                     begin and end a multi-line message
Ctrl-C stops the current answer."""


@dataclasses.dataclass
class Session:
    """What the commands change: sampling, system prompt, timings, and the conversation."""

    sampling: Sampling
    system: str | None
    verbose: bool
    grammar: str | None = None  # the command line's (--grammar, -j ...): what /set noformat goes back to
    history: list[dict] = dataclasses.field(default_factory=list)
    outgrown: bool = False  # the window is full: older exchanges are being forgotten (said once)

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.outgrown = False

    def make_room(self, model) -> int:
        """Forget the oldest exchanges (a message and its answer; never the system prompt or the new message)
        until the conversation leaves room for an answer in the context window, as ``ollama run`` and
        ``llama-cli`` do; returns how many were forgotten."""
        n_ctx = model.engine.n_ctx
        room = max(1, min(self.sampling.max_tokens, n_ctx // 2))  # an answer's worth, as -n allows
        first = int(bool(self.history) and self.history[0]["role"] == "system")
        dropped = 0
        while len(self.history) - first > 1 and len(model.tokenize_prompt(self.history)) + room > n_ctx:
            del self.history[first:first + 2]
            dropped += 1
        return dropped


def command(line: str, s: Session, model) -> str | None:
    """Apply a ``/command``; returns what to print (None: quit)."""
    word, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if word in ("bye", "exit", "quit"):
        return None
    if word in ("help", "?"):
        return HELP
    if word in ("reset", "clear"):
        s.reset()
        model.reset()
        return "(conversation cleared)"
    if word == "show":
        return _show(rest, s, model)
    if word == "load":  # the run loop loads it: it needs the command line's load flags
        return "usage: /load MODEL (a name, a stored variant or a .gguf path), or /load FILE.json that /save wrote"
    if word == "save":
        return _save(rest, s, model) if rest else "usage: /save FILE (the conversation as JSON; /load FILE resumes it)"
    if word == "set":
        return _set(rest, s, model)
    return f"unknown command '/{word}'; /help lists the commands"


def _show(what: str, s: Session, model) -> str:
    """/show (all) or Ollama's /show info, /show parameters, /show system (one part)."""
    changed = [k for k in MORE_SAMPLERS if k in PARAMS and getattr(s.sampling, k) != getattr(_DEFAULT, k)]
    params = ", ".join(f"{k} {_shown(s.sampling, k)}" for k in (*SHOWN, *changed)
                       if k != "seed" or s.sampling.seed != RANDOM_SEED)
    params += f", stop {list(s.sampling.stop)}" if s.sampling.stop else ""
    if s.sampling.grammar:
        params += ", format json" if s.sampling.grammar == _json_grammar() else ", grammar (the command line's)"
    parts = {"info": f"model: {model.name} ({'chat template' if model.is_chat else 'base model, no chat template'})"
                     f"\ncontext: {model.engine.n_ctx} tokens (trained: {model.engine.n_ctx_train}; -c/--ctx sets it)",
             "parameters": f"parameters: {params}", "system": f"system: {s.system or '(none)'}"}
    if not what:
        return "\n".join([*parts.values(), f"timings: {'on' if s.verbose else 'off'}"])
    if what in parts:
        return parts[what]
    if what == "template":
        return model.template or "(none: a base model; chat gets a plain-text transcript)"
    if what == "license":
        from ..models import resolve
        from ..models.cli import licence_of

        try:  # the catalog's name for it, else its file's (an encrypted one read with the key it was loaded with)
            ref = resolve(str(model.path))
            with contextlib.suppress(OndeviceError):
                named = resolve(model.name)  # a catalog model loaded by its name: the catalog's word for it
                ref = named if named.path == ref.path else ref
            return licence_of(ref) or "(the model's file names no licence)"
        except OndeviceError as e:
            return f"(its file cannot be read for it: {e})"
    return (f"/show takes info, parameters, system, template or license (nothing: the first three); `ondevice models "
            f"{model.name}` describes the model's file")


@functools.lru_cache(maxsize=1)
def _json_grammar() -> str:
    """Ollama's format json: the answer is a JSON object."""
    from .args import JSON_OBJECT
    from .grammar import schema_grammar

    return schema_grammar(JSON_OBJECT, "/set format json")


def _set(rest: str, s: Session, model) -> str:
    key, _, value = rest.partition(" ")
    if key == "parameter":  # Ollama's long form: /set parameter temperature 0
        key, _, value = value.strip().partition(" ")
    value = value.strip()
    if not key:
        return "usage: /set PARAMETER VALUE, /set stop TEXT ..., /set system TEXT or /set verbose|quiet (/help)"
    if key == "stop":  # Ollama's /set parameter stop A B: each word a stop string
        try:
            stop = tuple(unescape(w) for w in value.split())
        except InvalidArgument as e:
            return f"/set stop: {e}"
        s.sampling = dataclasses.replace(s.sampling, stop=stop)
        return f"stop = {list(stop)}"
    if key == "num_ctx":  # Ollama reloads the model for it; here the window is the one it was loaded with
        return (f"the context window is set when the model loads ({model.engine.n_ctx} tokens now): start chat "
                f"again with -c/--ctx N")
    if key in AT_LOAD:
        return f"{key} is set when the model loads: start chat again with {AT_LOAD[key]} N"
    if key in THINKING:
        return f"/set {key}: {THINKING[key]}"
    if key in DISPLAY_ONLY:
        return f"/set {key}: Ollama's display setting; nothing to change here (accepted)"
    if key == "format" or key == "noformat":
        if key == "format" and value != "json":
            return "/set format takes json (a JSON object per answer); /set noformat: free text"
        s.sampling = dataclasses.replace(s.sampling, grammar=_json_grammar() if key == "format" else s.grammar)
        if key == "format":
            return "answers are JSON objects"
        return "answers follow the command line's grammar again" if s.grammar else "answers are free text"
    if key in ("verbose", "quiet"):
        s.verbose = key == "verbose"
        return f"timings {'on' if s.verbose else 'off'}"
    if key == "system":
        if not value:
            return "usage: /set system TEXT"
        s.system = value
        s.reset()
        model.reset()
        return "(system prompt set; conversation cleared)"
    if key not in PARAMS:
        import difflib

        close = difflib.get_close_matches(key, [*PARAMS, "stop", "system", "verbose", "quiet", "format"], 1, 0.7)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return (f"cannot set '{key}'; {hint}/set takes a sampling parameter (/help names them), stop, system, "
                f"verbose, quiet or format json")
    field, typ = PARAMS[key]
    try:
        v = typ(value)
        s.sampling = dataclasses.replace(s.sampling, **{field: v})  # max_tokens -1: Sampling runs it to the end
    except ValueError:
        example = 1 if typ is int else 0.7
        return f"/set {key} needs a {'whole number' if typ is int else 'number'}, e.g. /set {key} {example}"
    except OndeviceError as e:
        return f"/set {key}: {e}"
    return f"{field} = {_shown(s.sampling, field)}"


def _shown(sampling: Sampling, field: str):
    """A parameter as /show and /set print it (max_tokens -1: until the text or the context ends)."""
    v = getattr(sampling, field)
    if field == "seed" and v == RANDOM_SEED:
        return "-1 (random)"
    return -1 if field == "max_tokens" and v == UNTIL_END else v


def _save(path: str, s: Session, model) -> str:
    """/save FILE: the conversation (its model, system prompt, changed parameters and messages) as JSON, which
    ``/load FILE`` resumes (Ollama's /save keeps it as a model; here it is a file)."""
    import json

    params = {k: getattr(s.sampling, k) for k in dict.fromkeys(f for f, _ in PARAMS.values())
              if getattr(s.sampling, k) != getattr(_DEFAULT, k)}
    state = {"model": model.name, "system": s.system, "parameters": {**params, "stop": list(s.sampling.stop)},
             "messages": [m for m in s.history if m["role"] != "system"]}
    from ..models.store import atomic_write

    earlier = _saved_before(path)
    if earlier is False:
        return (f"/save {path}: that file is there already and is not a conversation /save wrote; /save does not "
                f"replace it: give another file name, or move that one away first")
    try:  # a temp file, then renamed: an earlier save of the same name is never left half-written
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(state, f, ensure_ascii=False, indent=1)
    except OSError as e:
        return f"/save: {e}" if e.strerror is None else f"/save {path}: {e.strerror}; give a path you can write"
    if earlier:
        return f"(conversation saved to {path}, replacing the one saved there before; /load {path} resumes it)"
    return f"(conversation saved to {path}; /load {path} resumes it)"


SAVED_KEYS = {"model", "system", "parameters", "messages"}  # what /save writes and /load FILE reads


def _saved_before(path: str) -> bool | None:
    """What ``path`` holds: None nothing (or no regular file: a folder, /dev/stdout, which the write names or writes
    through), True a conversation /save wrote (replaced), False anything else (kept: /save refuses it)."""
    import json
    import os

    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and set(state) == SAVED_KEYS and isinstance(state["messages"], list)
