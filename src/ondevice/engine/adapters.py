"""LoRA adapters on a llama.cpp engine: loaded once per model, chosen per context (``llama_set_adapters_lora``).

llama.cpp applies one set of adapters to a whole ``llama_decode``, so the generator (engine/generator.py) runs
one decode per adapter set in a step, switching the set before each. A sequence's KV was computed under the
adapters active then, so it is not reused under others (the generator keys its prefix cache by adapter set).
"""

from __future__ import annotations

import ctypes
import weakref
from pathlib import Path

from ..errors import InvalidArgument, OndeviceError

MAX_SCALE = 10.0  # an adapter's scale (serve/schemas.py's per-request bound is the same)

class Adapters:
    """The adapters loaded on ``engine``'s model (by name) and the set active on its context."""

    def __init__(self, engine) -> None:
        from .llama import llama_cpp_lib

        self.engine = weakref.proxy(engine)  # the engine holds this: a strong link back would keep both alive
        self.loaded: dict[str, int] = {}  # name -> llama_adapter_lora *
        self.meta: dict[str, dict] = {}
        self.paths: dict[str, Path] = {}  # name -> the file it was loaded from
        self.scales: dict[str, float] = {}  # name -> the scale llama.cpp applies it at (1: as trained)
        self.base_of: dict[str, str] = {}  # a name made by scaled() -> the adapter's own name
        self.active: tuple[str, ...] = ()
        self._plain_sha: str | None = None
        lib = llama_cpp_lib()
        self._init = lib["llama_adapter_lora_init"]
        self._init.argtypes, self._init.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
        self._set = lib["llama_set_adapters_lora"]
        self._set.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                              ctypes.POINTER(ctypes.c_float)]
        self._set.restype = ctypes.c_int32

    @classmethod
    def attach(cls, engine, specs: tuple[str, ...]) -> Adapters:
        """The engine's adapters, ``specs`` loaded and active; on a refusal the engine is closed first."""
        self = cls(engine)
        try:
            self.use(tuple(self.load_spec(a) for a in specs))
        except BaseException:
            engine.close()
            raise
        return self

    def load(self, path: str | Path, name: str | None = None, scale: float = 1.0) -> str:
        """Load an adapter (a file, or a name in ``ondevice adapt``'s store) for this model, checked against the
        base by sha256 first, applied at ``scale`` whenever it is active; returns its name."""
        from ..adapt import store
        from ..adapt.adapter_file import check
        from .native import load_log

        if not -MAX_SCALE <= scale <= MAX_SCALE:  # its change times 1000 overflows: NaN logits, blamed on the model
            raise InvalidArgument(f"--adapter {path}:{scale:g}: an adapter's scale goes from -{MAX_SCALE:g} to "
                                  f"{MAX_SCALE:g} (1: as trained, 0: off), as the server's per-request scales")
        p = store.resolve(path)
        name = name or p.stem
        if "+" in name:  # a request picks adapters by model 'BASE+NAME': this one could never be asked for
            raise InvalidArgument(f"--adapter: the name {name!r} has a '+', which requests use to join adapters "
                                  f"('BASE+NAME'); name it without one: NAME=PATH")
        if "@" in name:  # scaled() names an adapter at another scale NAME@SCALE
            raise InvalidArgument(f"--adapter: the name {name!r} has an '@'; name it without one: NAME=PATH")
        if name in self.loaded:
            raise InvalidArgument(f"--adapter: the name {name!r} is given twice; name them NAME=PATH")
        self.meta[name] = check(p, self.engine.path, self._plain_sha256())
        self._check_tied_embedding(p, self.meta[name])
        with load_log() as lines:
            ptr = self._init(self.engine.model, str(p).encode())
        if not ptr:
            why = next((ln.strip() for ln in reversed("".join(lines).splitlines()) if "error" in ln.lower()
                        or "failed" in ln.lower()), "see ONDEVICE_VERBOSE=1")
            raise OndeviceError(f"llama.cpp could not load the adapter {p} for {self.engine.path.name}: {why}")
        self.loaded[name] = ptr
        self.scales[name] = float(scale)
        self.paths[name] = p
        return name

    def _check_tied_embedding(self, path: Path, meta: dict) -> None:
        """Refuse a LoRA on ``token_embd`` for a model whose output layer is its embedding (no ``output.weight``:
        SmolLM2, Gemma 3, Qwen2.5 0.5B): llama.cpp finds the adapter by tensor name for the output matmul too, where
        its shapes do not fit, and aborts the process (GGML_ASSERT ggml_can_mul_mat) at the first decode."""
        if "token_embd.weight.lora_a" not in meta.get("tensors", {}):
            return
        from ..models.gguf_check import validate_gguf

        restored = getattr(self.engine, "_restored", None)
        base = validate_gguf(restored.path if restored is not None else self.engine.path)
        if not any(t.name == "output.weight" for t in base.tensors):
            raise InvalidArgument(f"--adapter {path}: it adapts token_embd.weight, which {self.engine.path.name} "
                                  f"also uses as its output layer (tied embeddings), and llama.cpp cannot apply "
                                  f"such an adapter there (it aborts); use an adapter without token_embd tensors "
                                  f"(`ondevice adapt` trains none)")

    def _plain_sha256(self) -> str | None:
        """An encrypted base's plaintext sha256 (what its adapters record), from the memory it was restored
        into; None for a plain file (hashed by path, cached)."""
        restored = getattr(self.engine, "_restored", None)
        if restored is None:
            return None
        if self._plain_sha is None:
            import hashlib

            with open(restored.path, "rb") as f:
                self._plain_sha = hashlib.file_digest(f, "sha256").hexdigest()
        return self._plain_sha

    def load_spec(self, spec: str) -> str:
        """``NAME=PATH`` or ``PATH`` (named by its file stem), either with ``:SCALE`` after the PATH (llama.cpp's
        ``--lora-scaled``); a PATH may be a stored adapter's name."""
        from ..adapt.store import split_scale

        name, sep, path = spec.partition("=")
        if not (sep and name and "/" not in name):
            name, path = None, spec
        path, scale = split_scale(path)
        return self.load(path, name, scale)

    def scaled(self, name: str, scale: float) -> str:
        """The name of loaded adapter ``name`` applied at ``scale``: ``name`` itself at its own scale, else
        ``NAME@SCALE``, registered on first use (the same llama.cpp adapter, no copy). A set of such names is a
        set of (adapter, scale) pairs, so the generator's per-set decodes and prefix cache tell scales apart."""
        self.check((name,))
        name = self.base_of.get(name, name)
        scale = float(scale)
        if scale == self.scales[name]:
            return name
        key = f"{name}@{scale!r}"
        if key not in self.loaded:
            self.loaded[key], self.scales[key], self.base_of[key] = self.loaded[name], scale, name
        return key

    def check(self, names: tuple[str, ...]) -> None:
        """Raise InvalidArgument unless every one of ``names`` is loaded."""
        unknown = [n for n in names if n not in self.loaded]
        if unknown:
            raise InvalidArgument(f"no adapter named {unknown[0]!r}; loaded: {', '.join(self.own()) or 'none'}")

    def describe(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Each of ``names`` as an error names it: its own name and the scale it is applied at ("style at scale
        0.5", for a name scaled() made too)."""
        return tuple(f"{self.base_of.get(n, n)} at scale {self.scales[n]:g}" for n in names)

    def own(self) -> list[str]:
        """The adapters loaded, by their own names, in load order (not the names scaled() made)."""
        return [n for n in self.loaded if n not in self.base_of]

    def use(self, names: tuple[str, ...] = ()) -> None:
        """Make exactly ``names`` (each at its scale) the context's adapters; a no-op when they already are.

        A change is not free: llama.cpp re-reserves its compute graphs before the next decode
        (``sched_reserve``: 6-14 ms by its own log for SmolLM2-135M on 2 busy cores; adapt_bench's serving
        section measures it), so the generator starts each step with the set still active."""
        names = tuple(names)
        if names == self.active:
            return
        self.check(names)
        n = len(names)
        arr = (ctypes.c_void_p * max(1, n))(*[self.loaded[x] for x in names])
        scales = (ctypes.c_float * max(1, n))(*[self.scales[x] for x in names])
        if self._set(self.engine.ctx, arr if n else None, n, scales if n else None) != 0:
            raise OndeviceError(f"llama.cpp refused the adapters {', '.join(names)}")
        self.active = names
