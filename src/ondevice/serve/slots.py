"""llama-server's slot routes: ``GET /slots`` (each slot's state) and ``POST /slots/ID?action=save|restore|erase``
(a slot's prompt cache to and from a file in ``--slot-save-path``, in llama.cpp's format: engine/slotfile.py).

A long prompt that many requests begin with (a system prompt, an agent's tool list, a document) is computed
once, saved, and restored after a restart in milliseconds instead of prefilled again; a request whose prompt
begins with the restored tokens reuses them (from any slot, as every prompt's cached prefix is). An action on a
slot that is serving a request waits until it is idle, as llama-server defers it. Files are llama-server's:
either server restores the other's, for the same model and context settings. ``GET /slots`` is on by default,
as llama-server's (``--no-slots``: a 501); like llama-server's, it shows each slot's counts and settings, not its
prompt. A restored file's KV is checked by recomputing its last token: one damaged in a way its format checks
cannot see (NaN logits from then on) is dropped at once, with a 400 that names the file, not left for the next
request to fail on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import unicodedata
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Request
from fastapi.responses import JSONResponse

from ..engine import slotfile
from ..errors import InvalidArgument, NonFiniteLogits
from .http import error_response

WAIT_S = 0.05  # how often an action on a busy slot looks again

# llama.cpp's fs_validate_filename: no folders, no characters a file system refuses or a reader could misread
_FORBIDDEN = set(':*?"<>|/\\') | {"\uff0e", "\u2215", "\u2216", "\ufffd", "\ufeff"}


def applies(path: str) -> bool:
    return path == "/slots" or path.startswith("/slots/")


def valid_filename(name: str) -> bool:
    """llama.cpp's rule for a slot file's name (fs_validate_filename without folders)."""
    if not name or len(name.encode("utf-8", "surrogatepass")) > 255 or name == "." or ".." in name:
        return False
    if name[0] == " " or name[-1] in " .":
        return False
    return not any(c in _FORBIDDEN or unicodedata.category(c) in ("Cc", "Cs") for c in name)


def add_routes(app, state) -> None:
    batcher = state.batcher
    folder = state.settings.slot_save_path
    if folder and (gone := slotfile.sweep_stale(Path(folder).expanduser())):
        logging.getLogger("ondevice.serve").info("removed %d temp file%s that slot saves killed mid-write left in %s",
                                                 len(gone), "s" * (len(gone) > 1), folder)

    async def on_batcher(fn, request: Request):
        """``fn()`` on the batcher thread once its slot is idle (a busy slot: look again every WAIT_S); None: the
        client left first."""
        while True:
            try:
                return await state.on_batcher(fn, request)
            except slotfile.SlotBusy:
                if await request.is_disconnected():
                    return None
                await asyncio.sleep(WAIT_S)

    @app.get("/slots")
    async def slots(request: Request, fail_on_no_slot: str = ""):
        if not state.settings.slots:
            return error_response(501, "This server does not support slots endpoint. Start it with `--slots`",
                                  "not_supported_error")
        # read here, not on the batcher thread between two steps: a long prompt's prefill is one step of
        # seconds, and a monitor polling /slots would time out exactly when the server is busiest
        data = [_slot_json(state, s) for s in batcher.gen.slots]
        if fail_on_no_slot and all(d["is_processing"] for d in data):
            return error_response(503, "no slot available", "unavailable_error")
        return data

    @app.post("/slots/{id_slot}")
    async def slot_action(id_slot: str, request: Request, action: str = "",
                          body: Annotated[dict[str, Any] | None, Body()] = None):
        folder = state.settings.slot_save_path
        if not folder:
            return error_response(501, "This server does not support slots action. Start it with "
                                       "`--slot-save-path DIR`", "not_supported_error")
        try:
            seq = int(id_slot)
        except ValueError:
            raise InvalidArgument(f"Invalid slot ID {id_slot!r}: give a slot number (GET /slots lists them)") from None
        if action not in ("save", "restore", "erase"):
            raise InvalidArgument(f"Invalid action {action!r}: give ?action=save, restore or erase")
        t0 = time.perf_counter()
        if action == "erase":
            n = await on_batcher(lambda: slotfile.erase(batcher.gen, seq), request)
            return JSONResponse({}, status_code=499) if n is None else {"id_slot": seq, "n_erased": n}
        name = _filename(body or {})
        path = Path(folder).expanduser() / name
        ads = state.adapters_for(None)  # what a request naming no adapter runs under
        if action == "save":
            try:
                done = await on_batcher(lambda: slotfile.save(batcher.gen, seq, path, ads=ads, follow_links=False),
                                        request)
            except OSError as e:  # the folder or disk (UnwritablePath, a full disk): the server's, not the client's
                logging.getLogger("ondevice.serve").error("saving slot %d to %s failed: %s", seq, path, e)
                return error_response(500, f"Unable to save slot {seq} as {name}: the slot folder could not be "
                                           f"written ({getattr(e, 'strerror', None) or type(e).__name__}); the "
                                           f"server's log says why", "server_error")
            if done is None:
                return JSONResponse({}, status_code=499)
            return {"id_slot": seq, "filename": name, "n_saved": done[0], "n_written": done[1],
                    "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}
        done = await on_batcher(lambda: restore_checked(batcher.gen, seq, path, ads, name), request)
        if done is None:
            return JSONResponse({}, status_code=499)
        return {"id_slot": seq, "filename": name, "n_restored": done[0], "n_read": done[1],
                "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}


def restore_checked(gen, seq: int, path: Path, ads: tuple[str, ...], name: str) -> tuple[int, int]:
    """:func:`slotfile.restore`, then its last token recomputed over the restored KV (one token's decode): when
    that gives NaN or infinite logits the slot is emptied and the file is named as damaged, unless the same token
    with nothing before it does so too (then the model or ``ads``, its adapters, is the cause)."""
    done = slotfile.restore(gen, seq, path, ads, name, follow_links=False)  # a name a client chose
    slot = next(s for s in gen.slots if s.seq == seq)
    if not slot.cached or any(isinstance(getattr(s, "pending", None), int) for s in gen.slots):
        return done  # a request samples the last decode's logits next: a check's decode would replace them
    last = slot.cached[-1]
    if _finite(gen, seq, last, len(slot.cached) - 1, ads):
        return done
    slotfile.erase(gen, seq)
    model_ok = _finite(gen, seq, last, 0, ads)
    gen.eng.truncate(0, seq)
    if not model_ok:
        raise NonFiniteLogits(adapters=gen.adapters.describe(ads) if gen.adapters is not None else ads)
    raise slotfile.SlotFileError(f"{name}: its saved KV makes the model compute NaN or infinite logits, so the file "
                                 f"is damaged (the model computes that prompt fine without it); slot {seq} was "
                                 f"emptied. Delete the file, and save the slot again after a request with that prompt")


def _finite(gen, seq: int, token: int, pos: int, ads: tuple[str, ...]) -> bool:
    """Whether ``token`` decoded at ``pos`` of ``seq`` (the KV after it dropped), under adapters ``ads``, gives
    finite logits."""
    import numpy as np

    if gen.adapters is not None:
        gen.adapters.use(ads)  # the generator sets its own set again before its next decode
    gen.eng.truncate(pos, seq)
    gen.eng.decode_batch([(token, pos, seq, True)])
    return bool(np.isfinite(gen.eng.logits(0)).all())


def _filename(body: dict) -> str:
    name = body.get("filename")
    if not isinstance(name, str):
        raise InvalidArgument('filename is required: {"filename": "NAME"}, a file in --slot-save-path')
    if not valid_filename(name):
        raise InvalidArgument(f"Invalid filename {name!r}: a plain file name (no folders, no '..', none of "
                              f'\\ / : * ? " < > |, no control characters, not ending in a dot or space)')
    return name


def _slot_json(state, s) -> dict:
    """One slot in llama-server's /slots shape, read while the batcher may be stepping: each field once (a
    count may be a step older than another, as llama-server's are between two of its polls)."""
    from .native import settings_of

    gen = state.batcher.gen
    req = s.req
    job = req or state.batcher.last_job.get(s.seq)
    out = {"id": s.seq, "n_ctx": gen.slot_ctx, "speculative": bool(state.settings.draft),
           "is_processing": req is not None}
    if job is not None:
        n_cached, n_gen = getattr(s, "n_cached", 0), getattr(s, "n_gen", 0)
        out.update(n_prompt_tokens=len(job.tokens), n_prompt_tokens_processed=len(job.tokens) - n_cached,
                   n_prompt_tokens_cache=n_cached,
                   params=settings_of(state, job.sampling, False, job.logprobs or 0, None),
                   next_token=[{"has_next_token": req is not None,
                                "n_remain": job.sampling.max_tokens - n_gen, "n_decoded": n_gen}])
    out["n_cached"] = len(s.cached)  # tokens whose KV the slot holds (what a save writes)
    return out
