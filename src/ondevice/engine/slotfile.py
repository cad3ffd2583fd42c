"""A slot's prompt cache as a file: save the KV a slot holds, restore it later (another process, after a restart).

The file is llama.cpp's sequence-state file, the one ``llama_state_seq_save_file`` writes and llama-server's
``POST /slots/ID?action=save`` produces: ``'ggsq'``, the format version, the token count, the tokens, then the
sequence's KV as ``llama_state_seq_get_data`` gives it. The tokens are llama-server's token state (a null token,
its version, the count, the ids, no media), so a file written here restores in llama-server and one written by
llama-server (or by its older versions, a plain token list) restores here, for the same model and context
settings. Everything is checked in Python before llama.cpp reads the KV part (magic, version, counts against the
file's size, token ids against the vocabulary, the slot's context), and the restored KV must hold exactly the
file's tokens, so a truncated file or one from another model is an error that names it, never a crash.

Functions over a :class:`~ondevice.engine.generator.BatchGenerator`'s idle slots; the server runs them on its
batcher thread, between steps.
"""

from __future__ import annotations

import errno
import numbers
import os
import stat
import struct
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument, OndeviceError
from ..models.store import atomic_path
from .generator import BatchGenerator
from .slot import Slot

MAGIC = 0x67677371  # LLAMA_STATE_SEQ_MAGIC, 'ggsq'
VERSION = 3  # LLAMA_STATE_SEQ_VERSION of the llama.cpp that llama-cpp-python 0.3.36 vendors
_NULL = -1  # LLAMA_TOKEN_NULL: marks llama-server's token state (a plain token list never starts with it)
_TOKENS_VERSION = 1  # llama-server's SERVER_TOKENS_STATE_VERSION
_HEAD = struct.Struct("<III")
# llama_state_seq_get_data's own header (io_magic, the sequence), which the file leaves out
_IO = struct.Struct("<Ii")
_IO_MAGIC = 0xAF143CD8


class SlotFileError(OndeviceError):
    """A file that is no slot save for this model and slot, with what is wrong and what to do."""


class SlotBusy(InvalidArgument):
    """The slot is serving a request (the server waits for it, as llama-server defers the action)."""


def pack_tokens(tokens: list[int]) -> list[int]:
    """llama-server's token state of a text-only prompt: null token, version, count, ids, no media."""
    return [_NULL, _TOKENS_VERSION, len(tokens), *tokens, 0]


def unpack_tokens(packed: list[int], where: str) -> list[int]:
    """The prompt's ids from a file's tokens: llama-server's token state, or a plain list (its older files)."""
    if not packed or packed[0] != _NULL:
        return packed
    if len(packed) < 3 or packed[1] != _TOKENS_VERSION:
        raise SlotFileError(f"{where}: its token state has version {packed[1] if len(packed) > 1 else '?'}; "
                            f"this server reads version {_TOKENS_VERSION}")
    n = packed[2]
    rest = packed[3 + n:] if 0 <= n <= len(packed) - 3 else []
    if not rest:
        raise SlotFileError(f"{where}: its token state is cut short; save the slot again")
    if rest[0] != 0:
        raise SlotFileError(f"{where}: the saved prompt holds images or audio; this server reads text only")
    if len(rest) > 1:
        raise SlotFileError(f"{where}: trailing data after its token state; save the slot again")
    return packed[3:3 + n]


def _idle(gen: BatchGenerator, seq: int) -> Slot:
    slot = next((s for s in gen.slots if s.seq == seq), None)
    if slot is None:
        raise InvalidArgument(f"no slot {seq}: this server has slots {gen.slots[0].seq} to {gen.slots[-1].seq}")
    if slot.req is not None:
        raise SlotBusy(f"slot {seq} is serving a request")
    n_past = gen.eng.n_past(seq)  # trust what the KV holds, as insert() does
    if n_past < len(slot.cached):
        slot.cut(n_past)
    elif n_past > len(slot.cached):
        gen.eng.truncate(len(slot.cached), seq)
    return slot


def default_adapters(gen: BatchGenerator) -> tuple[str, ...]:
    """The adapter set a request naming none runs under in ``gen`` (the library's; the server passes its own)."""
    return gen.adapters.active if gen.adapters is not None else ()


def _not_followed(where: str, what: str) -> SlotFileError:
    return SlotFileError(f"{where} is {what}; slot files are read and written only as regular files in the slot "
                         f"folder, never through a link (the server's --slot-save-path): remove it, or give "
                         f"another filename")


def save(gen: BatchGenerator, seq: int, path: str | Path, keep: int | None = None,
         ads: tuple[str, ...] = (), follow_links: bool = True, what: str = "keep") -> tuple[int, int]:
    """Write slot ``seq``'s cached tokens and their KV to ``path`` (atomically); returns (tokens, bytes).
    ``keep``: only the first ``keep`` of them (the rest of the slot's cache is dropped first). ``ads``: the
    adapter set that requests naming none run under; a file records no adapters, so a slot computed under
    another set is refused (restored, its KV would be taken for ``ads``'). ``follow_links=False`` (the
    server's, for a client's filename): a symbolic link, folder, FIFO or device at ``path`` is refused here (a
    :class:`SlotFileError`), never written through. ``what``: ``keep``'s name in the caller's words."""
    if keep is not None:  # a negative one cut the tokens (a slice) and the KV (a position) apart
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or keep < 0:
            raise InvalidArgument(f"{what} must be a whole number of tokens >= 0 (or None: all of them), got "
                                  f"{keep!r}")
        keep = int(keep)
    path = Path(path)
    if not follow_links and (path.is_symlink() or (path.exists() and not path.is_file())):
        raise _not_followed(path.name, "a symbolic link" if path.is_symlink() else "not a regular file")
    slot = _idle(gen, seq)
    if slot.cached and slot.ads != ads:
        def under(a: tuple[str, ...]) -> str:
            return f"adapters {', '.join(a)}" if a else "no adapter"

        raise InvalidArgument(f"slot {seq} holds a prompt computed under {under(slot.ads)}, not under the default "
                              f"({under(ads)}); a slot file records no adapters, so send the prompt again with no "
                              f"adapter named (the default) and save the slot then")
    if keep is not None and keep < len(slot.cached):
        slot.cut(keep)
        gen.eng.truncate(keep, seq)
    tokens = list(slot.cached)
    packed = pack_tokens(tokens)
    raw = memoryview(gen.eng.save_state(seq))[8:]  # after the engine's own position header
    if len(raw) < _IO.size or _IO.unpack_from(raw)[0] != _IO_MAGIC:
        raise OndeviceError(f"llama.cpp gave slot {seq}'s state without its header; this llama-cpp-python "
                            f"is not the one ondevice pins (0.3.36)")
    state = raw[_IO.size:]
    with atomic_path(path, follow_links=follow_links) as tmp, open(tmp, "wb") as f:
        _hold(f)  # while this process writes it: a temp file no one holds is a killed save's (sweep_stale)
        f.write(_HEAD.pack(MAGIC, VERSION, len(packed)))
        f.write(np.asarray(packed, dtype="<i4").tobytes())
        f.write(state)
    return len(tokens), _HEAD.size + 4 * len(packed) + len(state)


def _hold(f) -> bool:
    """Lock the open file ``f`` (released when it is closed, or when the process dies: a SIGKILL too); False where
    the lock is held elsewhere or there are no such locks (not POSIX)."""
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (ImportError, OSError):
        return False


def sweep_stale(folder: str | Path, min_age_s: float = 60.0) -> list[str]:
    """Remove the temp files (``.NAME.XXXXXXXX.tmp``) that saves killed mid-write (SIGKILL, a power cut) left in
    ``folder``: those no process holds (:func:`_hold`) and untouched for ``min_age_s`` (a save just begun has not
    taken its lock yet). Another server sharing the folder keeps its saves in progress. Returns the names removed."""
    import re
    import time

    gone = []
    for p in Path(folder).glob(".*.tmp"):
        if not re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", p.name):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime >= min_age_s and _hold(f):
                p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def read(path: str | Path, n_vocab: int, max_tokens: int, seq: int = 0,
         name: str | None = None, follow_links: bool = True) -> tuple[list[int], bytearray, int]:
    """A slot file's prompt tokens, its KV as :meth:`LlamaEngine.load_state` takes it for sequence ``seq``
    (read once, in place) and the file's size; all checked here, before anything native reads it.
    ``follow_links=False``: a symbolic link at ``path`` is refused (``O_NOFOLLOW``), as is a FIFO or device."""
    where = name or str(path)
    extra = 0 if follow_links else os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a FIFO opens at once, then is refused
    try:
        f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | extra))  # noqa: SIM115 -- closed below
        if not follow_links and not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.close()
            raise _not_followed(where, "not a regular file")
    except FileNotFoundError:
        raise SlotFileError(f"{where}: no such file; save a slot under that name first") from None
    except IsADirectoryError:
        raise SlotFileError(f"{where} is a folder, not a slot file") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_links:
            raise _not_followed(where, "a symbolic link") from None
        raise SlotFileError(f"{where}: cannot be read ({e.strerror or type(e).__name__})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise SlotFileError(f"{where}: {size} bytes is too short for a slot file")
        magic, version, n = _HEAD.unpack(head)
        if magic != MAGIC:
            raise SlotFileError(f"{where} is not a slot file (it does not start with llama.cpp's 'ggsq')")
        if version != VERSION:
            raise SlotFileError(f"{where} is a version {version} slot file; this llama.cpp reads version {VERSION} "
                                f"(save the slot again with this server)")
        end = _HEAD.size + 4 * n
        if end > size:
            raise SlotFileError(f"{where}: it says {n} tokens but is only {size} bytes long; it is cut short")
        tokens = unpack_tokens(np.frombuffer(f.read(4 * n), dtype="<i4").tolist(), where)
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise SlotFileError(f"{where} holds token {bad}, outside this model's vocabulary (0 to {n_vocab - 1}); "
                                f"it was saved with another model")
        if len(tokens) > max_tokens:
            raise SlotFileError(f"{where} holds {len(tokens)} tokens but the context here holds {max_tokens}; "
                                f"give a larger -c/--ctx")
        state = bytearray(8 + _IO.size + size - end)  # load_state's position header, llama.cpp's, the KV
        struct.pack_into("<q", state, 0, len(tokens))
        _IO.pack_into(state, 8, _IO_MAGIC, seq)
        if f.readinto(memoryview(state)[8 + _IO.size:]) != size - end:
            raise SlotFileError(f"{where} changed while it was read; try again")
    _check_cells(memoryview(state)[8 + _IO.size:], len(tokens), where)
    return tokens, state, size


def restore(gen: BatchGenerator, seq: int, path: str | Path, ads: tuple[str, ...] = (),
            name: str | None = None, follow_links: bool = True) -> tuple[int, int]:
    """Load ``path`` into slot ``seq`` (its previous cache is dropped); requests sharing the file's prompt as
    a prefix then reuse it. ``ads``: the adapter set the KV counts as computed under (the server's default);
    ``name``: the file as errors call it (default: its path). A file records no adapters: restore it under the
    adapter set it was saved with. ``follow_links``: as :func:`read`'s. Returns (tokens, bytes read)."""
    slot = _idle(gen, seq)
    tokens, state, size = read(path, gen.eng.n_vocab, gen.slot_ctx - 1, seq, name, follow_links)
    slot.forget()
    try:
        gen.eng.load_state(state, seq)
    except OndeviceError as e:
        gen.eng.truncate(0, seq)
        if _cut_short(memoryview(state)[8 + _IO.size:]):
            raise SlotFileError(f"{name or path} is cut short (its KV part ends before the size it gives); the "
                                f"file is damaged, save it again") from None
        raise SlotFileError(f"{name or path}: {e}; it was saved with another model or other context settings "
                            f"(KV type, slots)") from None
    slot.cached, slot.ads = tokens, ads
    return len(tokens), size


def _check_cells(state: memoryview, n: int, where: str) -> None:
    """The KV part's cells before llama.cpp reads them: one stream holds them, at increasing positions ending at
    the last token (a model with sliding-window layers saves only the window). A position outside them would
    stay in the cache for good: llama_memory_seq_rm cannot remove a negative one or INT_MAX."""
    bad = SlotFileError(f"{where}: its KV cells do not match its {n} tokens; the file is damaged, save the slot again")
    if len(state) < 4:
        raise bad
    (n_stream,) = struct.unpack_from("<I", state)
    off = 4
    for s in range(n_stream):
        if off + 4 > len(state):
            raise bad
        (count,) = struct.unpack_from("<I", state, off)
        off += 4
        if count == 0:
            continue
        if count > n or off + 12 * count > len(state):
            raise bad
        cells = np.frombuffer(state, dtype="<i4", count=3 * count, offset=off).reshape(count, 3)  # pos, 1, seq
        pos = cells[:, 0]
        later = bytes(state[len(state) - 4 * (n_stream - s - 1):]) if s < n_stream - 1 else b""
        if (cells[:, 1] != 1).any() or pos[0] < 0 or pos[-1] != n - 1 or (np.diff(pos) <= 0).any() or any(later):
            raise bad
        return
    if n:
        raise bad


def _cut_short(state: memoryview) -> bool:
    """Whether the KV part ends before its first stream's data does (llama.cpp's layout: the cells, then
    ``v_trans``, ``n_layer``, each layer's K type, row size and rows, then V likewise, or transposed: type,
    element size, width and columns). Only a diagnosis once llama.cpp has refused the file."""
    try:
        (n_stream,) = struct.unpack_from("<I", state)
        off = 4
        for _ in range(n_stream):
            (count,) = struct.unpack_from("<I", state, off)
            off += 4 + 12 * count
            if count:
                break
        v_trans, n_layer = struct.unpack_from("<II", state, off)
        off += 8
        for part in ("k", "v"):
            for _ in range(n_layer):
                if part == "v" and v_trans:
                    _, size_el, width = struct.unpack_from("<iII", state, off)
                    off += 12 + size_el * width * count
                else:
                    _, row = struct.unpack_from("<iQ", state, off)
                    off += 12 + row * count
        return off > len(state)
    except struct.error:  # a header past the end
        return True


def erase(gen: BatchGenerator, seq: int) -> int:
    """Forget slot ``seq``'s cached prompt; returns how many tokens it held."""
    slot = _idle(gen, seq)
    n = len(slot.cached)
    slot.forget()
    gen.eng.truncate(0, seq)
    return n
