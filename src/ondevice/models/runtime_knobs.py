"""The runtime knobs a stored variant carries: what ``ondevice fit --knobs`` measured fastest on this machine
(threads, flash attention, micro-batch), applied when the variant loads (``ondevice.load``, run, chat, serve) where
no flag, env var or keyword sets them, as an Ollama model carries its parameters. A fit that finds the file in hand
best stores no variant: the knobs it measured on that file are kept in the store's ``knobs`` folder, for that file
as it was measured (its size and mtime). Kept apart from ``fit`` (which writes them) so that a load does not import
the fit's planner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FA_WORDS = {None: "auto", True: "on", False: "off"}  # -fa's words for EngineConfig.flash_attn
_FIELDS = {"threads": "n_threads", "flash_attn": "flash_attn", "n_ubatch": "n_ubatch"}  # knob: its EngineConfig field
_FLAG = {"n_threads": "-t {}", "flash_attn": "-fa {}", "n_ubatch": "-ub {}"}


def _valid(knob: str, value: object) -> bool:
    return value is None or isinstance(value, bool) if knob == "flash_attn" else type(value) is int and value >= 1


def _kept_for(path: Path) -> Path:
    """Where the knobs measured on ``path``, a file the fit does not copy into the store, are kept."""
    from .store import models_dir

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return models_dir(create=False) / "knobs" / f"{path.stem}-{key}.json"


def keep_knobs(path: str | Path, provenance: dict) -> Path:
    """Keep ``provenance`` (``machine``, ``llama_build``, ``profile`` and ``measured.runtime``, as a stored variant's
    sidecar holds them) for the file at ``path``: its loads apply the knobs while it is the file measured."""
    from .store import _stamp, write_json

    path = Path(path)
    out = _kept_for(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"file": str(path.resolve()), "stamp": _stamp(path), "provenance": provenance})
    return out


def forget_knobs(path: Path) -> None:
    """Drop the knobs kept for the file at ``path`` (``ondevice rm`` removes it: a later file of that name is another
    file, measured by its own fit)."""
    _kept_for(path).unlink(missing_ok=True)


def _record(path: Path) -> tuple[dict | None, str]:
    """The record that holds ``path``'s knobs (a stored variant's sidecar, or the one kept for a file in hand), and
    "" or why a kept one no longer counts."""
    from .store import _stamp, read_provenance

    prov = read_provenance(path)
    if isinstance(prov, dict) and "provenance" in prov:
        return prov, ""
    try:
        kept = json.loads(_kept_for(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ""
    if not isinstance(kept, dict) or kept.get("stamp") != _stamp(path):
        return None, (f"the runtime knobs `ondevice fit --knobs` measured on {path.name} are for the file as it was "
                      f"then, and it has changed since: not applied; run the fit again to measure them")
    return kept, ""


def fitted_knobs(path: str | Path, given: dict) -> tuple[dict, str]:
    """The runtime knobs ``ondevice fit --knobs`` chose for the stored variant (or the file kept) at ``path``, as
    EngineConfig keywords for a load to apply, and a line that says so ("" where there are none). ``given``: the
    EngineConfig fields the caller set (a flag, an env var or a keyword): a knob never overrides them. The knobs are
    applied only where they were measured: on this machine, with this llama.cpp build (a knob's speed is the CPU's
    and the kernels') and on the host itself, not under a device profile; elsewhere the line says why they were
    not."""

    def mapping(d: object, key: str) -> dict:
        return d.get(key) if isinstance(d, dict) and isinstance(d.get(key), dict) else {}

    record, why = _record(Path(path))
    if why:
        return {}, why
    prov = mapping(record, "provenance")
    rt = mapping(mapping(prov, "measured"), "runtime")
    if not rt.get("flags"):
        return {}, ""
    default = next((t for t in rt.get("trials") or () if isinstance(t, dict) and t.get("what") == "default"), None)
    knobs = rt.get("knobs")
    if default is None or not isinstance(knobs, dict) or not all(_valid(f, knobs.get(f)) for f in _FIELDS):
        return {}, (f"the runtime knobs stored with {Path(path).name} are damaged (its .json file): not applied; run "
                    f"`ondevice fit --knobs` again to measure them")
    from ..device.info import machine_key
    from ..device.kernels import build_id

    chosen = {_FIELDS[k]: v for k, v in knobs.items() if k in _FIELDS and v != default.get(k)}
    profile = prov.get("profile")
    where = ("under the device profile " + repr(profile.get("spec") if isinstance(profile, dict) else profile)
             if profile else "on another machine" if prov.get("machine") != machine_key()
             else "with another llama.cpp build" if prov.get("llama_build") != build_id() else None)
    if where:
        return {}, f"the runtime knobs `ondevice fit --knobs` chose ({rt['flags']}) were measured {where}: not applied"
    if given.get("type_v", "f16") not in ("f16", "f32", "bf16"):  # a quantized V cache needs flash attention
        given = {**given, "flash_attn": True}
    config = {f: v for f, v in chosen.items() if f not in given}
    if not config:
        return {}, ""
    flags = " ".join(_FLAG[f].format(FA_WORDS[v] if f == "flash_attn" else v) for f, v in config.items())
    return config, (f"runtime knobs `ondevice fit --knobs` measured on this machine: {flags} (a flag given "
                    f"overrides its knob)")
