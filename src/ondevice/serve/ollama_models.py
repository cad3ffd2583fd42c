"""Ollama's descriptions of the served models (/api/tags, /api/ps, /api/show): names, size, digest, details and
model_info from the GGUF file, and /api/show's Modelfile. An adapter model (``BASE+NAME``) is shown as Ollama shows a
model created ``FROM`` another with an ``ADAPTER``: its Modelfile names both files, its ``details.parent_model`` the
base."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool

from ..errors import OndeviceError
from ..models.gguf_split import total_size
from ..models.licences import licence_display
from .fim import NoInfill, fim_tokens

NEVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: the model stays loaded while the server runs


def created_at(at: float | None = None) -> str:
    """RFC 3339 UTC of ``at`` (default: now), as Ollama's ``created_at``."""
    return datetime.fromtimestamp(time.time() if at is None else at, UTC).isoformat().replace("+00:00", "Z")


def _tagged(model_id: str) -> str:
    return model_id if ":" in model_id else f"{model_id}:latest"


def names(state) -> dict[str, str]:
    """Ollama's name of each served model (``name:tag``) -> its id on the chat route (the base, ``BASE+ADAPTER``)."""
    return {_tagged(c.id): c.id for c in state.model_cards()}


def _inserts(state) -> bool:
    """Whether the model has fill-in-the-middle tokens (Ollama's "insert" capability: generate takes a suffix)."""
    try:
        return bool(fim_tokens(state))
    except NoInfill:
        return False


@functools.lru_cache(maxsize=4)
def _facts(path: str) -> tuple[int, float, str, dict, dict]:
    """(size, mtime, digest, Ollama's details, model_info) of the served model file, taken once: the server serves
    the bytes it loaded, so the file being removed (`ondevice rm`) or replaced later changes none of them (the
    sha256 is cached on disk by the models store, so a file is hashed once)."""
    import os
    from pathlib import Path

    import gguf

    from ..models import resolve
    from ..models.store import cached_sha256

    st = os.stat(path)
    size, mtime = total_size(Path(path)), st.st_mtime  # a split model: every shard
    digest, details = "sha256:" + cached_sha256(path), {"parent_model": "", "format": "gguf"}
    try:
        info = resolve(path).info
    except OndeviceError:  # e.g. a protected model whose key is not at hand: no details
        return size, mtime, digest, details, {}
    try:
        quant = gguf.LlamaFileType(info.file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        quant = next(iter(info.quant_mix), "")  # the type of most tensor bytes
    meta = {k: v for k, v in info.metadata.items()
            if not isinstance(v, (list, tuple)) and k != "tokenizer.chat_template"}
    return size, mtime, digest, details | {
        "family": info.architecture, "families": [info.architecture], "quantization_level": quant,
        "parameter_size": info.params_label}, meta | {"general.parameter_count": info.parameters}


async def entries(state) -> tuple[list[dict], dict]:
    """(Ollama's entries of the served model and of each of its adapters, the model's model_info). A file removed
    before it was first listed gives entries with what is known without it, never a 500 on a listing."""
    try:
        size, mtime, digest, details, meta = await run_in_threadpool(_facts, str(state.path))
    except OSError:  # gone (`ondevice rm`) before the first listing: the model still answers from memory
        size, mtime, digest, details, meta = 0, time.time(), "", {"parent_model": "", "format": "gguf"}, {}
    base = _tagged(state.model_id)
    return [{"name": name, "model": name, "modified_at": created_at(mtime), "size": size, "digest": digest,
             "details": details | ({"parent_model": base} if state.named_adapters(model) else {})}
            for name, model in names(state).items()], meta


async def show(state, model: str) -> dict:
    """/api/show of ``model`` (its chat route id): the base's template, details and model_info; an adapter model's
    Modelfile adds ``ADAPTER`` lines and its details name the base as ``parent_model``."""
    listed, meta = await entries(state)
    entry = next(e for e in listed if e["name"] == _tagged(model))
    adapters = state.named_adapters(model)
    paths = state.engine.adapters.paths if adapters else {}
    modelfile = f"# served by ondevice\nFROM {state.path}\n" + "".join(f"ADAPTER {paths[n]}\n" for n in adapters)
    # tools: any chat model takes them (a template that does not render tools gets them in a system note, and
    # the grammar writes the calls); Ollama's clients refuse to send tools to a model without it
    caps = ["completion"] + (["tools"] if state.template else []) + (
        ["insert"] if _inserts(state) else [])  # insert: generate takes a suffix (fill in the middle)
    return {"modelfile": modelfile, "parameters": f"num_ctx {state.settings.ctx}", "template": state.template or "",
            "license": licence_display(meta.get("general.license", "")), "details": entry["details"],
            "model_info": meta, "capabilities": caps, "modified_at": entry["modified_at"]}
