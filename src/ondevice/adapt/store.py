"""Adapters by name: ``ondevice adapt --name NAME`` stores ``<home>/adapters/NAME.gguf``, and every ``--adapter``
(run, chat, eval, serve's ``a=NAME``) takes that name as well as a path. No torch here: the engine resolves
names through this module.

The adapter file carries its own provenance (``ondevice.adapter.*``: base sha256 and name, data sha256,
settings, figures, creation time), so the store is just a directory and nothing can fall out of step with it.
"""

from __future__ import annotations

import math
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path

from ..errors import InvalidArgument
from ..models.store import home

# no '+' (serve's model 'BASE+NAME' picks adapters) and no '=' (serve's --adapter NAME=PATH)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def adapters_dir() -> Path:
    """``home()/adapters``, created on first use."""
    d = home() / "adapters"
    d.mkdir(parents=True, exist_ok=True)
    return d


def path_for(name: str) -> Path:
    """Where the stored adapter ``name`` lives (the name checked, the file not required)."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgument(f"adapter name {name!r} is not allowed; use letters, digits and . _ - (no '+' or "
                              f"'=', which serve's model 'BASE+NAME' and --adapter NAME=PATH use), e.g. dates-v2")
    return adapters_dir() / f"{name}.gguf"


def target(out: str | Path | None, name: str | None, default_name: str) -> Path:
    """The adapter file a training run writes: ``out``, else ``name`` (or ``default_name``) in the store."""
    # both: one would be dropped without a word (-o DIR is check_out_file's to refuse, naming the file to give)
    if out and name is not None and not Path(out).is_dir():
        raise InvalidArgument(f"-o {out} and --name {name} both given: -o writes the adapter to that file, --name "
                              f"stores it by name (`ondevice adapt list`, `--adapter {name}`); give one of them")
    if out:
        return Path(out)
    if name is None and not _NAME_RE.fullmatch(default_name):  # named after a file like "train (1).jsonl"
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", default_name).strip("-.") or "adapter"
        raise InvalidArgument(f"the adapter is named after its data file, {default_name!r}, which is not an adapter "
                              f"name (letters, digits and . _ -); give --name {safe} or -o {safe}.gguf")
    return path_for(default_name if name is None else name)  # --name "" is refused, not replaced by the default


def refuse_replacing_other_data(path: Path, data: str | Path, replace: str = "") -> None:
    """A run named after its data file (no --name, no -o) whose name is taken by a stored adapter not made from
    that data (everyone's file is train.jsonl; or a soup, which records none): refused before training, since it
    would replace that adapter (``replace``: what else the fix needs, the CLI's `` --force``)."""
    from ..models.store import sha256_file
    from .adapter_file import KEY, read_meta

    if not (path.is_file() and Path(data).is_file()):
        return
    try:
        meta = read_meta(path)
    except InvalidArgument:  # unreadable: nothing is lost by replacing it
        return
    if meta.get(KEY + "data_sha256") == sha256_file(data):  # the same data again: its own adapter, replaced
        return
    when = str(meta.get(KEY + "created") or "")[:16].replace("T", " ")
    src = (meta.get(KEY + "settings") or {}).get("data")
    same_file = src is not None and Path(str(src)).resolve() == Path(data).resolve()  # the file was edited since
    what = (f"was made from an earlier version of {data} (it has changed since)" if same_file else
            f"was not made from {data}")
    raise InvalidArgument(f"the stored adapter {path.stem!r} ({when}{', from ' + str(src) if src else ''}) {what}; "
                          f"give this run its own --name (e.g. --name {path.stem}-2), or --name {path.stem}{replace} "
                          f"to replace that adapter")


def check_out_file(out: str | Path | None, what: str, example: str) -> None:
    """``-o`` names the file to write: a directory is refused before any work (found out only at the final
    rename otherwise, naming a temp file), with the file to give instead."""
    if out is not None and Path(out).is_dir():
        raise InvalidArgument(f"-o {out} is a directory; give the {what} file, e.g. -o {Path(out) / example}")


def names() -> list[str]:
    """The stored adapters' names, sorted."""
    return sorted(p.stem for p in adapters_dir().glob("*.gguf") if not p.name.startswith("."))


_CKPT = ".gguf.ckpt.pt"


def interrupted_names() -> list[str]:
    """Names of interrupted runs into the store (a checkpoint; an adapter of that name too for a rerun), sorted."""
    return sorted(p.name.removesuffix(_CKPT) for p in adapters_dir().glob(f"*{_CKPT}") if not p.name.startswith("."))


def size_text(n: int) -> str:
    """Bytes as people read them: '35.2 KiB' below a MiB (0.0 MiB said nothing), else '12.3 MiB'."""
    if n < 2**10:
        return f"{n} B"
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.endswith(".gguf") or spec.startswith(("~", "."))


def split_scale(spec: str) -> tuple[str, float]:
    """``PATH:SCALE`` (llama.cpp's ``--lora-scaled FILE:SCALE``) -> (PATH, SCALE); a spec whose text after its last
    ':' is not a number is all path (scale 1). The scale multiplies the adapter's change (0: none, 1: as trained)."""
    head, sep, tail = str(spec).rpartition(":")
    if not sep or not head:
        return str(spec), 1.0
    try:
        scale = float(tail)
    except ValueError:
        stored = _NAME_RE.fullmatch(head) and (adapters_dir() / f"{head}.gguf").is_file()
        if head.endswith(".gguf") or Path(head).expanduser().is_file() or stored:  # then a scale that is no number
            raise InvalidArgument(f"--adapter {spec}: the scale after ':' must be a number, e.g. {head}:0.5") from None
        return str(spec), 1.0
    if not math.isfinite(scale):
        raise InvalidArgument(f"--adapter {spec}: the scale after ':' must be a finite number, e.g. {head}:0.5")
    return head, scale


def resolve(spec: str | Path, flag: str = "--adapter") -> Path:
    """The adapter file ``spec`` names: a path (anything with a '/' or ending in .gguf), a stored adapter's
    name, or else an existing file of that name; an unknown name lists the stored ones (after ``flag``)."""
    s = str(spec)
    if isinstance(spec, Path) or _looks_like_path(s):
        return Path(s).expanduser()
    if _NAME_RE.fullmatch(s) and (p := adapters_dir() / f"{s}.gguf").is_file():
        return p
    if Path(s).is_file():
        return Path(s)
    known = names()
    raise InvalidArgument(f"{flag} {s}: no such adapter file or stored adapter; stored: "
                          f"{', '.join(known) if known else 'none (train one with `ondevice adapt DATA --name NAME`)'}"
                          f" (`ondevice adapt list` shows them)")


def remove(specs: list[str]) -> list[tuple[str, int]]:
    """Delete the stored adapters ``specs`` (names), each with what a run of that name left beside it (its
    checkpoint, its --from deferred export), or what an interrupted run of that name left; every name is checked
    before any file goes, so a typo removes nothing. Returns (name, bytes freed) per adapter."""
    def files(n: str) -> list[Path]:
        p = adapters_dir() / f"{n}.gguf"
        return [p, *(Path(f"{p}{ext}") for ext in (".ckpt.pt", ".ckpt.part", ".deferred.jsonl"))]

    known = names()
    interrupted = {s for s in specs if _NAME_RE.fullmatch(s) and any(f.is_file() for f in files(s))}
    missing = [s for s in specs if s not in known and s not in interrupted]
    if missing:
        raise InvalidArgument(f"adapt rm {' '.join(missing)}: no such stored adapter or interrupted run; stored: "
                              f"{', '.join(known) if known else 'none'} (a file of your own is yours to delete)")
    out = []
    for n in dict.fromkeys(specs):
        freed = sum(f.stat().st_size for f in files(n) if f.is_file())
        for f in files(n):
            f.unlink(missing_ok=True)
        out.append((n, freed))
    return out


def describe(path: Path) -> dict:
    """One listing row: name, base, size, date and the run's key figures, from the file's own provenance."""
    from .adapter_file import KEY, read_meta

    meta = read_meta(path)
    fig = meta.get(KEY + "figures") or {}
    plan = meta.get(KEY + "plan") or {}
    st = path.stat()
    return {"name": path.stem, "path": str(path), "base": meta.get(KEY + "base_name"),
            "base_sha256": meta.get(KEY + "base_sha256"), "size_bytes": st.st_size,
            "created": meta.get(KEY + "created")
            or datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds"),
            "tensors": len(plan) or len(meta["tensors"]) // 2, "params": fig.get("trainable_params"),
            "steps": fig.get("steps"), "heldout_loss_before": fig.get("heldout_loss_before"),
            "heldout_loss_after": fig.get("heldout_loss_after"), "peak_rss_bytes": fig.get("peak_rss_bytes"),
            "data_sha256": meta.get(KEY + "data_sha256")}


def listing() -> list[dict]:
    """Every stored adapter (a file that cannot be read shows as such, the others still list), then every
    interrupted run into the store (as HF's ``checkpoint-N`` folders are there to see), by name."""
    out = []
    for n in names():
        p = adapters_dir() / f"{n}.gguf"
        try:
            out.append(describe(p))
        except InvalidArgument as e:
            out.append({"name": n, "path": str(p), "error": str(e)})
    out += [describe_interrupted(n) for n in interrupted_names()]
    return sorted(out, key=lambda r: r["name"])  # stable: a rerun's row after its adapter's


def describe_interrupted(name: str) -> dict:
    """One listing row for an interrupted run: its checkpoint's step, steps and the command that resumes it."""
    p = adapters_dir() / f"{name}{_CKPT}"
    st = p.stat()
    row = {"name": name, "path": str(p), "base": None, "size_bytes": st.st_size,
           "created": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds"),
           "interrupted": {"step": None, "steps": None, "resume": None},
           "rerun": (adapters_dir() / f"{name}.gguf").exists()}  # the stored adapter stays until the rerun ends
    try:
        import torch

        state = torch.load(p, weights_only=True, map_location="cpu")
        step = int(state["step"])
    except ImportError:
        row["interrupted"]["error"] = "reading a checkpoint needs torch: pip install 'ondevice[adapt]'"
        return row
    except Exception as e:  # noqa: BLE001 — a file that is no checkpoint of ours: said, the others still list
        row["interrupted"]["error"] = f"unreadable checkpoint: {type(e).__name__}"
        return row
    run = state.get("run") or {}  # an older ondevice's checkpoint has none: the step is all it says
    row["base"] = run.get("base")
    row["interrupted"] = {"step": step, "steps": run.get("steps"), "resume": resume_command(name, state)}
    return row


def resume_command(name: str, state: dict) -> str | None:
    """The ``ondevice adapt ... --resume`` that continues the checkpoint ``state`` of the stored run ``name``:
    the data, base and the settings a resume must keep (those not at their defaults), and the steps asked for."""
    from .train import DEFAULT_STEPS, FIXED_ON_RESUME, AdaptConfig, _shown

    run = state.get("run")
    if not run:
        return None
    d = AdaptConfig(data="")
    deferred = Path(run["data"]).resolve() == Path(f"{adapters_dir() / name}.gguf.deferred.jsonl").resolve()
    cmd = ["ondevice", "adapt", *(("--from", "deferred") if deferred else (run["data"],)), "--name", name]
    if run.get("model"):
        cmd += ["-m", run["model"]]
    for k, flag in FIXED_ON_RESUME.items():
        v = (state.get("settings") or {}).get(k, getattr(d, k))
        if _shown(k, v) != _shown(k, getattr(d, k)):
            cmd += [flag, _shown(k, v)]
    if run.get("epochs") is not None:
        cmd += ["--epochs", f"{run['epochs']:g}"]
    elif run.get("steps_given") not in (None, DEFAULT_STEPS):
        cmd += ["--steps", str(run["steps_given"])]
    return shlex.join([*cmd, "--resume"])


def table(rows: list[dict]) -> str:
    """The listing as aligned columns."""
    def fmt(r: dict) -> list[str]:
        if "error" in r:
            return [r["name"], "-", "-", "-", f"unreadable: {r['error']}"]
        when = r["created"][:16].replace("T", " ")
        if "interrupted" in r:
            i = r["interrupted"]
            at = "" if i["step"] is None else f" at step {i['step']}" + (f"/{i['steps']}" if i["steps"] else "")
            # a rerun's: the file (rm would remove the stored adapter too)
            drop = f"delete {r['path']}" if r.get("rerun") else f"`ondevice adapt rm {r['name']}`"
            how = (f"`{i['resume']}` to continue" if i["resume"] else f"{drop} to drop it" if i.get("error")
                   else "the same command plus --resume to continue")
            why = f" ({i['error']})" if i.get("error") else ""
            what = "a rerun, interrupted" if r.get("rerun") else "interrupted"
            return [r["name"], r["base"] or "?", size_text(r["size_bytes"]), when, f"{what}{at}{why}: {how}"]
        held = ("" if r["heldout_loss_before"] is None or r["heldout_loss_after"] is None
                else f", held-out loss {r['heldout_loss_before']:.3f} -> {r['heldout_loss_after']:.3f}")
        peak = f", peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB" if r["peak_rss_bytes"] else ""
        params = f", {r['params']:,} params" if r["params"] else ""
        steps = f"{r['steps']} steps, " if r["steps"] else ""
        return [r["name"], r["base"] or "?", size_text(r["size_bytes"]), when,
                f"{steps}{r['tensors']} tensors{params}{held}{peak}"]

    head = ["NAME", "BASE", "SIZE", "CREATED (UTC)", "FIGURES"]
    lines = [head, *map(fmt, rows)]
    w = [max(len(x[i]) for x in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(x[:-1])) + "  " + x[-1] for x in lines)


def made_note(path: Path) -> str:
    """' (made 2026-12-05 12:37 from train.jsonl)': when and from what the adapter at ``path`` was made, if it says."""
    from .adapter_file import KEY, read_meta

    try:
        meta = read_meta(path)
    except InvalidArgument:  # not an adapter we can read: nothing to say about it
        return ""
    when = str(meta.get(KEY + "created") or "")[:16].replace("T", " ")
    src = (meta.get(KEY + "settings") or {}).get("data")
    said = " ".join(x for x in (when, f"from {src}" if src else "") if x)
    return f" (made {said})" if said else ""


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are one file (the same inode: a link, ``./x`` and ``x``, another spelling)."""
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there: not the same file
        return False


def _holds(path: Path, kind: str) -> bool:
    """Whether the file at ``path`` is what the verb writes (``adapter``: a GGUF LoRA adapter; ``model``: a GGUF
    model), so that replacing it with --force loses nothing the user did not mean to replace."""
    if kind == "adapter":
        from .adapter_file import lora_meta

        try:
            lora_meta(path, "-o")
        except InvalidArgument:
            return False
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_output(path: Path, kind: str, verb: str, force: bool, keep: list[tuple[str, str | Path | None]],
                 given: str | None = None, *, library: bool = False) -> None:
    """The one check of the file ``adapt``, ``adapt merge`` and ``adapt average`` write (``path``; ``given``: the -o
    text, for the wording), before any work: refused even with ``force`` when it is one of the files the run reads
    (``keep``: [(what it is, its path)]; compared as files, so a link or ``./x`` is caught) or an existing file that
    is not a ``kind`` (``adapter`` or ``model``: a data file, a model, anything else); an existing ``kind`` only
    with ``force``. ``library``: worded for a Python call (``out=``, ``force=True``), not the CLI's flags."""
    out, force_word = ("out=", "force=True") if library else ("-o ", "--force")
    shown = str(path) if given is None else f"out={given!r}" if library else f"-o {given}"
    for role, f in keep:
        if f is not None and _same_file(path, f):
            raise InvalidArgument(f"{shown} is {role} ({f}), which {verb} reads; write to another path ({force_word} "
                                  f"does not change this)")
    if not path.exists():
        return
    if not _holds(path, kind):
        noun = "a LoRA adapter" if kind == "adapter" else "a GGUF model"
        raise InvalidArgument(f"{shown} is there already and is not {noun}; {verb} does not replace it, even with "
                              f"{force_word}: give {out.strip()} a new file, or move that one away first")
    refuse_replacing(path, f"{verb} would replace the {'adapter' if kind == 'adapter' else 'model'}", force,
                     force_word,
                     f"write to another path ({out.strip()})" if verb == "adapt merge" else "give another name")


def refuse_replacing(path: Path, what: str, force: bool, force_word: str = "--force (force=True)",
                     other: str = "give another name") -> None:
    """``path`` (what merge or average would write) is there already: refused without ``force`` (``force_word``:
    how the caller gives it), naming what it holds, since a typo in --name would replace hours of training without
    a word."""
    if path.exists() and not force:
        raise InvalidArgument(f"{what} {path}{made_note(path)}; {other}, or {force_word} to replace it")
