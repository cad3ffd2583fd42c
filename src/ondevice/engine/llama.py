"""llama.cpp backend over llama-cpp-python's low-level ctypes API.

The high-level ``llama_cpp.Llama`` class adds Python work per token (numpy copies of the whole logits
row, Python-side sampling); here each step is one ``llama_decode`` plus llama.cpp's native sampler
chain, so the per-token Python cost is a few ctypes calls.
"""

from __future__ import annotations

import ctypes
import re
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import ContextOverflow, InvalidArgument, ModelClosed, OndeviceError
from ..protect.container import is_container
from . import native
from .abort import AbortFlag, DecodeAborted
from .base import Engine, EngineConfig
from .llama_flags import KV_TYPE_IDS
from .records import Generation, Sampling
from .resources import check_kv_memory, check_threads, physical_cores
from .sampler import NO_TOKEN, Sampler  # noqa: F401 (NO_TOKEN: what sample() returns, named here too)

_POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}
_KV_TYPES = KV_TYPE_IDS
_init_lock = threading.Lock()
_backend_ready = False
_log_callback = None
_EOG_LINE = re.compile(r"\bEOG token\s*=\s*(\d+)\b")  # llama_vocab::print_info, once per member of the set


def _lib():
    """Import llama_cpp once, initialise the backend and silence its logs unless ONDEVICE_VERBOSE=1."""
    global _backend_ready
    import llama_cpp

    with _init_lock:
        if not _backend_ready:
            global _log_callback
            sys.unraisablehook = native.keep_interrupts(sys.unraisablehook)
            _log_callback = native.make_log_callback()  # kept referenced: llama.cpp holds the pointer
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


def set_fields(st, **values):
    """Set fields of a llama.cpp params struct and return it. ctypes takes any attribute name silently, so a
    field that llama-cpp-python's struct lacks (a version skew) is an error here rather than a no-op."""
    missing = sorted(set(values) - {f[0] for f in type(st)._fields_})
    if missing:
        raise OndeviceError(f"llama-cpp-python's {type(st).__name__} has no field {', '.join(missing)}; "
                            f"install the version ondevice pins: pip install 'llama-cpp-python==0.3.36'")
    for k, v in values.items():
        setattr(st, k, v)
    return st


def llama_cpp_lib() -> ctypes.CDLL:
    """The loaded libllama, for bindings of our own (``lib[name]`` gives a fresh function object)."""
    import llama_cpp.llama_cpp

    return llama_cpp.llama_cpp._lib


def build_info() -> str:
    """llama-cpp-python version and llama.cpp's system info line."""
    ll = _lib()
    info = ll.llama_print_system_info().decode(errors="replace").strip()
    return f"llama-cpp-python {ll.__version__}; {info}"


class LlamaEngine(Engine):
    """One model and one context; up to ``config.n_seq_max`` sequences, each with its share of the KV cache."""

    def __init__(self, path: str | Path, config: EngineConfig | None = None):
        self.ll = ll = _lib()
        self.config = cfg = config or EngineConfig()
        self.path = Path(path)
        self.ctx = None
        for name, v in (("type_k", cfg.type_k), ("type_v", cfg.type_v)):
            if v not in _KV_TYPES:
                raise InvalidArgument(f"--{name.replace('_', '-')} {v!r} is not a KV cache type; use one of "
                                      f"{', '.join(_KV_TYPES)}")
        if cfg.flash_attn is False and cfg.type_v not in ("f32", "f16", "bf16"):  # llama.cpp refuses the context
            raise InvalidArgument(f"a quantized V cache ({cfg.type_v}) needs flash attention in llama.cpp: add -fa 1 "
                                  "(flash_attn=True) or leave it auto, or keep -ctv f16")
        t0 = time.perf_counter()
        self.kernels, self.buffer_types, self.model = self._load_model(ll, cfg)
        if native.pending_interrupt and self.model:  # Ctrl-C while llama.cpp loaded: stop here, nothing held
            ll.llama_model_free(self.model)
            self.model = None
            self.close()
        native.raise_pending_interrupt()
        if not self.model:
            why = getattr(self, "_load_error", None)
            raise OndeviceError(f"llama.cpp could not load {self.path}: {why}" if why else
                                f"llama.cpp could not load {self.path}; run with ONDEVICE_VERBOSE=1 to see why")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = ll.llama_model_n_ctx_train(self.model)
        n_ctx = cfg.n_ctx or min(self.n_ctx_train, 4096)
        if n_ctx < 16:
            raise InvalidArgument(f"--ctx / n_ctx={cfg.n_ctx} is too small; use at least 16" if cfg.n_ctx else
                                  f"the model says it was trained with a context of {self.n_ctx_train} tokens; "
                                  f"give one with --ctx N (n_ctx=N)")
        check_kv_memory(self._info, n_ctx, self.n_ctx_train, cfg.type_k, cfg.type_v, self.path.name,
                        n_ctx if cfg.kv_unified else n_ctx // max(1, cfg.n_seq_max))
        threads = check_threads(cfg.n_threads or physical_cores())
        batch_threads = threads  # n_threads_batch None, 0 or -1: as n_threads
        if cfg.n_threads_batch not in (None, 0, -1):
            batch_threads = check_threads(cfg.n_threads_batch, "--threads-batch / n_threads_batch")
        if cfg.pooling is not None and cfg.pooling not in _POOLING:
            raise InvalidArgument(f"pooling {cfg.pooling!r} is not a pooling type; use one of {', '.join(_POOLING)}")
        n_batch = min(cfg.n_batch, n_ctx * max(1, cfg.n_seq_max))
        cparams = set_fields(
            ll.llama_context_default_params(), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(cfg.n_ubatch, n_batch),
            n_seq_max=cfg.n_seq_max, n_threads=threads, n_threads_batch=batch_threads,
            type_k=_KV_TYPES[cfg.type_k], type_v=_KV_TYPES[cfg.type_v],
            flash_attn_type=-1 if cfg.flash_attn is None else int(bool(cfg.flash_attn)),
            embeddings=cfg.embeddings, no_perf=True,
            # split (the default, as llama-server with -np N): each sequence has its own n_ctx / n_seq_max cells
            # and attends over those only; unified: one pool, and every sequence's attention spans all cells
            kv_unified=cfg.kv_unified,
            **({"pooling_type": _POOLING[cfg.pooling]} if cfg.pooling is not None else {}))
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            ll.llama_model_free(self.model)
            self.model = None
            self.close()
            raise OndeviceError(f"llama.cpp could not create a context (n_ctx={n_ctx}); try a smaller --ctx")
        # llama.cpp pads the KV to a multiple of 256 cells; the context the user asked for is still the limit
        self.n_ctx = min(n_ctx, ll.llama_n_ctx(self.ctx))
        self.n_batch = cparams.n_batch
        self.n_threads = threads
        self.mem = ll.llama_get_memory(self.ctx)
        self.abort_flag = AbortFlag(ll, self.ctx)  # set: the decode running stops (engine/abort.py)
        self._batch = ll.llama_batch_init(self.n_batch, 0, max(1, cfg.n_seq_max))
        self._n_past: dict[int, int] = {}
        self._n_rows = 0  # logits rows produced by the last decode
        # llama.cpp has no call that returns its end-of-generation set, but its load logs each member ("EOG token =
        # N", after the vocabulary is final); asking every token instead took 58/152/269 ms (SmolLM2/Qwen2.5/Gemma-3)
        eog, logged = ll.llama_vocab_is_eog, self._eog_logged
        self.eos_tokens = frozenset(logged if logged and all(eog(self.vocab, t) for t in logged)
                                    else (t for t in range(self.n_vocab) if eog(self.vocab, t)))
        self._pieces: dict[int, bytes] = {}  # token -> bytes, filled as tokens are generated
        # our own binding of llama_get_logits_ith returning the address (llama_cpp's returns a ctypes pointer,
        # which costs ~60 us per token to turn into an array), and numpy views kept per address
        self._logits_ith = llama_cpp_lib()["llama_get_logits_ith"]
        self._logits_ith.argtypes, self._logits_ith.restype = [ctypes.c_void_p, ctypes.c_int32], ctypes.c_void_p
        self._views: dict[int, np.ndarray] = {}
        from .adapters import Adapters

        self.adapters = Adapters.attach(self, cfg.adapters)  # LoRA (adapt/); cfg.adapters active from the start
        if cfg.warmup:
            self.warmup()
        if native.pending_interrupt:
            self.close()
            native.raise_pending_interrupt()
        self.load_time = time.perf_counter() - t0 - self.kernel_test_time

    @property
    def kernels_used(self) -> str:
        """The extra CPU buffer types the weights really sit in, '+'-joined in the build's order ('none': plain CPU)."""
        from . import bufts

        return "+".join(b for b in bufts.offered() if b in self.buffer_types) or "none"

    def _load_model(self, ll, cfg: EngineConfig):
        """Load the weights with the extra CPU kernels chosen for this machine (device/kernels.py).

        Returns (the choice, ``{buffer type: MiB}`` the load really used, the model pointer or NULL).
        """
        from ..device import kernels
        from ..supervise import note_loaded
        from . import bufts

        self._restored = self._info = None
        if is_container(self.path):  # an encrypted model: restored into anonymous memory (protect/)
            from ..protect.load import begin, kernel_path

            self._restored = begin(self.path, cfg.key_source, mode=cfg.restore)
        else:  # every load (run, chat, serve, bench, eval) passes here: a malformed file is an error, not an abort
            from ..models.gguf_check import validate_gguf

            self._info = validate_gguf(self.path)
        r = self._restored
        t0 = time.perf_counter()  # the first load of a set of weight types here self-tests the kernels: not load time
        choice = (kernels.resolve(cfg.amx, cfg.repack, kernel_path(r), types=r.types) if r is not None
                  else kernels.resolve(cfg.amx, cfg.repack, self.path))
        self.kernel_test_time = time.perf_counter() - t0
        with bufts.offering(choice.bufts) as use_extra, native.load_log(quiet=True) as lines:
            # llama.cpp's "auto" load mode maps the file (as llama-bench's -lm auto); "none" reads it into memory
            mode = (3 if cfg.mlock else -1) if cfg.use_mmap else (2 if cfg.mlock else 0)  # 3, 2: MMAP_MLOCK, MLOCK
            mparams = set_fields(ll.llama_model_default_params(), load_mode=mode,
                                 n_gpu_layers=0, use_extra_bufts=use_extra)
            if self._restored is not None:
                from ..protect.load import finish

                model = finish(ll, self._restored, mparams)
            else:
                model = ll.llama_model_load_from_file(str(self.path).encode(), mparams)
        log = "".join(lines).splitlines()
        self._load_error = next((ln.split("error loading model:", 1)[1].strip() for ln in reversed(log)
                                 if "error loading model:" in ln), None)  # llama.cpp's reason, for our message
        used = bufts.parse_buffers(log)
        note_loaded(choice.to_dict(), used)
        self._eog_logged = {int(m.group(1)) for ln in log if (m := _EOG_LINE.search(ln))}
        return choice, used, model

    def warmup(self) -> None:
        """One tiny decode (pages the weights in, sizes the buffers), then an empty cache.

        Decode from one thread only, and warm up on that thread: llama.cpp's OpenMP build keeps a worker
        team per calling thread, and a second team anywhere in the process slows every later decode
        (by about 30% on 2 cores here). The server therefore warms up and decodes on its batcher thread.
        """
        if self.config.embeddings:
            return
        bos = self.ll.llama_vocab_bos(self.vocab)
        self.decode(max(bos, 0))
        self.reset()

    # -- text <-> tokens -------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        self._open()
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON) is not text any tokenizer can take
            raise InvalidArgument(f"the text holds {text[e.start:e.end]!r} at character {e.start}, a lone UTF-16 "
                                  f"surrogate, which is not valid Unicode; send the character itself or a "
                                  f"surrogate pair") from None
        n_max = len(data) + 8
        buf = (self.ll.llama_token * n_max)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (self.ll.llama_token * n_max)()
            n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        self._open()
        if not special and token in self._pieces:
            return self._pieces[token]
        if not (isinstance(token, (int, np.integer)) and 0 <= token < self.n_vocab):  # else llama.cpp aborts
            raise InvalidArgument(f"token id {token!r} is not in the vocabulary (0 to {self.n_vocab - 1})")
        buf = ctypes.create_string_buffer(64)  # its own: tokenize/detokenize may run in any thread
        n = self.ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.ll.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        piece = buf.raw[:n]
        if not special:
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    def control_tokens(self) -> dict[str, int]:
        """Text -> id of the tokens llama.cpp's tokenizer matches only when parsing specials (control and unknown
        tokens, e.g. ``<|im_start|>``): a chat's message text must never become one of them (engine/chat.py)."""
        self._open()
        if getattr(self, "_controls", None) is None:
            mask = self.ll.LLAMA_TOKEN_ATTR_CONTROL | self.ll.LLAMA_TOKEN_ATTR_UNKNOWN
            get = self.ll.llama_vocab_get_attr
            controls: dict[str, int] = {}
            for t in range(self.n_vocab):
                if get(self.vocab, t) & mask:
                    text = self.token_text(t)
                    if text:
                        controls.setdefault(text, t)
            self._controls = controls  # published whole: another thread never sees half a table
        return self._controls

    @property
    def bos_token(self) -> int:
        self._open()
        return self.ll.llama_vocab_bos(self.vocab)

    @property
    def eos_token(self) -> int:
        self._open()
        return self.ll.llama_vocab_eos(self.vocab)

    @property
    def add_bos(self) -> bool:
        self._open()
        return bool(self.ll.llama_vocab_get_add_bos(self.vocab))

    def chat_template(self) -> str | None:
        self._open()
        raw = self.ll.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def meta(self, key: str) -> str | None:
        self._open()
        buf = ctypes.create_string_buffer(4096)
        n = self.ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    # -- the KV cache --------------------------------------------------------------------------
    def decode_batch(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` over ``(token, pos, seq, want_logits)`` items (at most ``n_batch``).

        Rows with ``want_logits`` are numbered in order; read them with :meth:`logits`.
        """
        self._open()
        b = self._batch
        n = len(items)
        if n > self.n_batch:
            raise ValueError(f"batch of {n} exceeds n_batch={self.n_batch}")
        n_rows = 0
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
            n_rows += bool(want)
        b.n_tokens = n
        rc = self.ll.llama_decode(self.ctx, b)
        if rc == 1:
            raise ContextOverflow(max(self._n_past.values(), default=0) + n, self.n_ctx, "KV cache content")
        if rc == 2:  # the abort flag: llama.cpp kept the micro-batches done before, each sequence a prefix
            for seq in {it[2] for it in items}:
                self._n_past[seq] = self.ll.llama_memory_seq_pos_max(self.mem, seq) + 1
            raise DecodeAborted("llama_decode was aborted")
        if rc != 0:
            raise OndeviceError(f"llama_decode failed with code {rc}")
        self._n_rows = n_rows
        for _, pos, seq, _ in items:  # keep n_past current for sequences fed only through decode_batch
            if pos >= self._n_past.get(seq, 0):
                self._n_past[seq] = pos + 1
        if native.pending_interrupt:  # from an eval callback (fit's imatrix)
            native.raise_pending_interrupt()

    def embed(self, tokens: Sequence[int], seq: int = 0) -> np.ndarray:
        """Pooled embedding ``(n_embd,)`` of ``tokens`` (needs ``embeddings=True`` and a pooling type); many
        inputs in one decode: engine/embed.py."""
        from .embed import embed_batch

        return embed_batch(self, [tokens], seq0=seq)[0]

    def prefill(self, tokens: Sequence[int], seq: int = 0, logits_all: bool = False) -> None:
        pos = self._n_past.get(seq, 0)
        if pos + len(tokens) > self.n_ctx:
            raise ContextOverflow(pos + len(tokens), self.n_ctx)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            self.decode_batch([(t, pos + start + j, seq, logits_all or (last and j == len(chunk) - 1))
                               for j, t in enumerate(chunk)])
        self._n_past[seq] = pos + len(tokens)

    def decode(self, token: int, seq: int = 0) -> None:
        self._open()
        pos = self._n_past.get(seq, 0)
        if pos >= self.n_ctx:
            raise ContextOverflow(pos + 1, self.n_ctx, "conversation")
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = token, pos, 1, 1
        b.seq_id[0][0] = seq
        b.n_tokens = 1
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise OndeviceError(f"llama_decode failed with code {rc} at position {pos}")
        self._n_rows = 1
        self._n_past[seq] = pos + 1

    def logits(self, i: int | np.ndarray = -1) -> np.ndarray:
        return self._row(i).copy()

    def _row(self, i: int | np.ndarray) -> np.ndarray:
        """Logits row ``i`` of the last decode as a view into llama.cpp's buffer (valid until the next decode);
        a saved row (an array) is itself."""
        self._open()
        if isinstance(i, np.ndarray):
            return i
        addr = self._logits_ith(self.ctx, i)
        if not addr:
            raise IndexError(f"no logits for row {i}")
        view = self._views.get(addr)
        if view is None:
            if len(self._views) >= 4096:  # rows of many batch shapes: start over rather than grow
                self._views.clear()
            view = np.frombuffer((ctypes.c_float * self.n_vocab).from_address(addr), dtype=np.float32)
            self._views[addr] = view
        return view

    def all_logits(self) -> np.ndarray:
        """Every logits row of the last decode, ``(n_rows, n_vocab)`` float32 (a copy)."""
        ptr = self.ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(self._n_rows, self.n_vocab)).copy()

    def n_past(self, seq: int = 0) -> int:
        return self._n_past.get(seq, 0)

    def truncate(self, n: int, seq: int = 0) -> None:
        # the KV itself says how far it reaches: an interrupt (Ctrl-C) between llama_decode and the bookkeeping
        # after it leaves n_past behind the cache, and the next decode at that position would fail
        self._open()
        if n < max(self._n_past.get(seq, 0), self.ll.llama_memory_seq_pos_max(self.mem, seq) + 1):
            self.ll.llama_memory_seq_rm(self.mem, seq, n, -1)
            self._n_past[seq] = n

    def copy_seq(self, src: int, dst: int) -> None:
        """Give ``dst`` the KV of ``src`` (prefix cache between slots).

        Split KV: llama.cpp copies the whole stream before the next decode; unified: the cells are shared.
        """
        self._open()
        self.ll.llama_memory_seq_rm(self.mem, dst, 0, -1)
        self.ll.llama_memory_seq_cp(self.mem, src, dst, 0, -1)
        self._n_past[dst] = self._n_past.get(src, 0)

    def reset(self) -> None:
        self._open()
        self.ll.llama_memory_clear(self.mem, True)
        self._n_past.clear()

    def save_state(self, seq: int = 0) -> bytearray:
        """The KV of ``seq`` as bytes (8-byte position header + llama.cpp's sequence state), copied once."""
        self._open()
        size = self.ll.llama_state_seq_get_size(self.ctx, seq)
        out = bytearray(8 + size)
        struct.pack_into("<q", out, 0, self._n_past.get(seq, 0))
        view = (ctypes.c_uint8 * size).from_buffer(out, 8)
        n = self.ll.llama_state_seq_get_data(self.ctx, view, size, seq)
        del view  # before the bytearray is cut to what was written
        del out[8 + n:]
        return out

    def load_state(self, state: bytes | bytearray, seq: int = 0) -> None:
        """Restore ``seq`` from :meth:`save_state`'s bytes (a bytearray is read in place, not copied)."""
        self._open()
        (n_past,) = struct.unpack_from("<q", state)
        size = len(state) - 8
        self.ll.llama_memory_seq_rm(self.mem, seq, 0, -1)
        buf = ((ctypes.c_uint8 * size).from_buffer(state, 8) if isinstance(state, bytearray)
               else (ctypes.c_uint8 * size).from_buffer_copy(state, 8))
        with native.load_log(quiet=True) as log:  # llama.cpp's reason goes into our message
            nread = self.ll.llama_state_seq_set_data(self.ctx, buf, size, seq)
        del buf  # the caller's bytearray is free to change size again
        held = self.ll.llama_memory_seq_pos_max(self.mem, seq) + 1
        if nread != size or held != n_past:  # refused, trailing bytes, or not the positions it claims
            self.ll.llama_memory_seq_rm(self.mem, seq, 0, -1)
            self._n_past[seq] = 0
            why = next((x.strip() for x in reversed(log) if x.strip() and "error loading state" not in x), "")
            if nread == 0:
                raise OndeviceError(f"the saved KV state does not fit this model/context ({why or 'refused'})")
            raise OndeviceError(f"the saved KV state holds {held} positions in {nread} of its {size} bytes, not the "
                                f"{n_past} positions it claims")
        self._n_past[seq] = n_past

    # -- sampling ------------------------------------------------------------------------------
    def make_sampler(self, sampling: Sampling, prompt: Sequence[int] = ()) -> Sampler:
        return Sampler(self, sampling, prompt)

    def sample(self, sampler: object, i: int | np.ndarray = -1) -> int:
        """The next token from logits row ``i`` of the last decode or a saved row (accepted by ``sampler``), or
        :data:`NO_TOKEN` when a grammar admits no further token: the caller must then end the generation with
        finish_reason "stop". (:meth:`Sampler.sample` decides how.)"""
        self._open()
        assert isinstance(sampler, Sampler)
        return sampler.sample(i) if isinstance(i, np.ndarray) else sampler.sample(self._row(i), i)

    def stream_tokens(self, tokens: Sequence[int], sampling: Sampling, seq: int = 0) -> Iterator[Generation]:
        """Prefill ``tokens`` after what ``seq`` already holds, then decode; one record per token.

        A batch of one through the generator (engine/generator.py), the one place tokens are generated. With
        no ``tokens`` the first one is sampled from the logits of the last decode. ``prompt_tokens`` counts
        the whole context before generation, ``cached_tokens`` the part that ``seq`` already held.
        """
        from .generator import BatchGenerator, Request

        n_cached = self.n_past(seq)
        gen = BatchGenerator(self, seqs=[seq])
        gen.slots[0].cached = [-1] * n_cached  # KV of tokens we do not know, reused as it is
        yield from gen.stream(Request(tokens=[-1] * n_cached + list(tokens), sampling=sampling,
                                      from_logits=not tokens))

    def _open(self) -> None:
        """After ``close`` every call that reaches llama.cpp is an error, not a read of freed memory."""
        if not self.ctx:
            raise ModelClosed(f"the model {self.path.name} was closed; load it again")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.ll.llama_batch_free(self._batch)
            self.ll.llama_free(self.ctx)
            self.ll.llama_model_free(self.model)
            self.ctx = self.model = self.vocab = self.mem = None
        if getattr(self, "_restored", None) is not None:
            self._restored.close()  # after llama.cpp unmapped it: the plaintext is wiped
            self._restored = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

