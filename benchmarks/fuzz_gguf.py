"""Fuzz the GGUF loader: mutants of the shipped SmolLM2 GGUF, each loaded as ``ondevice`` loads a model.

Every mutant must end as a clean error (``OndeviceError``, e.g. ``InvalidModelFile``) or a model that loads and
decodes a token. A child process that dies on a signal is a *crash*, one that runs past the timeout a *hang*,
an exception that is not an ``OndeviceError`` a *traceback*: the counts of those three should be 0.

Mutations are seeded and in place (same file size), aimed at the header, the metadata (scalars, strings,
array counts, key names, the vocabulary) and the tensor infos, plus the known-bad values llama.cpp asserts on
(alignment, block count, norm epsilon, tokenizer model) and truncations. Each worker keeps one full-size copy
of the model in /dev/shm and rewrites only the header bytes per mutant, so a mutant costs a header write, the
validation and (when it passes) a load with a 32-token context and one decode.

    python benchmarks/fuzz_gguf.py -n 10000 --workers 2 --seed 1      # counts by outcome, crashes listed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("clean_error", "ran", "crash", "hang", "traceback")
INTERESTING_INTS = (0, 1, 2, 3, 7, 8, 16, 31, 63, 255, 256, 511, 512, 513, 1024, 4096, 65535, 65536, 2**31 - 1,
                    2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
INTERESTING_FLOATS = (float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-30, 1e30, -1e-6)


@dataclass(frozen=True)
class Field:
    """One place in the header a mutation can aim at: ``offset``, ``size`` bytes, ``kind``."""

    name: str
    offset: int
    size: int
    kind: str  # "u8".."i64", "f32", "f64", "bool", "strlen", "strbytes", "count", "type", "dims", "shape", "toff"


_SCALAR = {0: ("u8", 1), 1: ("i8", 1), 2: ("u16", 2), 3: ("i16", 2), 4: ("u32", 4), 5: ("i32", 4), 6: ("f32", 4),
           7: ("bool", 1), 10: ("u64", 8), 11: ("i64", 8), 12: ("f64", 8)}


@dataclass(frozen=True)
class Layout:
    """Where everything in a (valid) GGUF header is: its fields, the end of the tensor infos, the data."""

    fields: list[Field]
    values: dict[str, object]  # metadata scalars and strings
    ti_start: int  # first tensor info (just after the last metadata entry)
    ti_end: int  # end of the tensor infos (before the padding)
    data_offset: int
    alignment: int


def layout(path: Path, sample: int = 400) -> Layout:
    """Walk a GGUF header (a valid one: this is the fuzzer's map, not a validator); ``sample`` array items each."""
    raw = path.read_bytes()[:64 << 20]
    pos = 24
    fields = [Field("magic", 0, 4, "strbytes"), Field("version", 4, 4, "u32"), Field("n_tensors", 8, 8, "u64"),
              Field("n_kv", 16, 8, "u64")]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    values: dict[str, object] = {}

    def string(name: str, keep: bool = True) -> str:
        nonlocal pos
        n = struct.unpack_from("<Q", raw, pos)[0]
        if keep:
            fields.append(Field(f"{name}:len", pos, 8, "strlen"))
            fields.append(Field(f"{name}:bytes", pos + 8, n, "strbytes"))
        text = raw[pos + 8:pos + 8 + n].decode("utf-8", errors="replace")
        pos += 8 + n
        return text

    for _ in range(n_kv):
        key = string("key")
        fields[-2] = Field(f"{key}:keylen", fields[-2].offset, 8, "strlen")
        fields[-1] = Field(f"{key}:key", fields[-1].offset, fields[-1].size, "strbytes")
        vt = struct.unpack_from("<I", raw, pos)[0]
        fields.append(Field(f"{key}:type", pos, 4, "type"))
        pos += 4
        if vt in _SCALAR:
            kind, n = _SCALAR[vt]
            fields.append(Field(f"{key}:value", pos, n, kind))
            values[key] = struct.unpack_from({"u8": "<B", "i8": "<b", "u16": "<H", "i16": "<h", "u32": "<I",
                                              "i32": "<i", "f32": "<f", "bool": "<?", "u64": "<Q", "i64": "<q",
                                              "f64": "<d"}[kind], raw, pos)[0]
            pos += n
        elif vt == 8:
            n = struct.unpack_from("<Q", raw, pos)[0]
            fields.append(Field(f"{key}:len", pos, 8, "strlen"))
            fields.append(Field(f"{key}:value", pos + 8, n, "strbytes"))
            values[key] = raw[pos + 8:pos + 8 + n].decode("utf-8", errors="replace")
            pos += 8 + n
        else:  # an array (of scalars or strings)
            it, count = struct.unpack_from("<IQ", raw, pos)
            fields.append(Field(f"{key}:itemtype", pos, 4, "type"))
            fields.append(Field(f"{key}:count", pos + 4, 8, "count"))
            pos += 12
            pick = set(random.Random(count).sample(range(count), min(sample, count)))
            if it in _SCALAR:
                kind, n = _SCALAR[it]
                fields += [Field(f"{key}[{i}]", pos + i * n, n, kind) for i in sorted(pick)]
                pos += count * n
            else:
                for i in range(count):
                    n = struct.unpack_from("<Q", raw, pos)[0]
                    if i in pick:
                        fields.append(Field(f"{key}[{i}]:len", pos, 8, "strlen"))
                        fields.append(Field(f"{key}[{i}]", pos + 8, n, "strbytes"))
                    pos += 8 + n
    ti_start = pos
    for i in range(n_tensors):
        name = string(f"tensor #{i}")
        fields[-2] = Field(f"tensor {name}:strlen", fields[-2].offset, 8, "strlen")
        fields[-1] = Field(f"tensor {name}:name", fields[-1].offset, fields[-1].size, "strbytes")
        n_dims = struct.unpack_from("<I", raw, pos)[0]
        fields.append(Field(f"tensor {name}:dims", pos, 4, "dims"))
        pos += 4
        fields += [Field(f"tensor {name}:shape[{d}]", pos + 8 * d, 8, "shape") for d in range(n_dims)]
        pos += 8 * n_dims
        fields.append(Field(f"tensor {name}:type", pos, 4, "type"))
        fields.append(Field(f"tensor {name}:offset", pos + 4, 8, "toff"))
        pos += 12
    alignment = int(values.get("general.alignment", 32))
    return Layout(fields, values, ti_start, pos, -(-pos // alignment) * alignment, alignment)


def splice(src: Path, dst: Path, start: int, end: int, new: bytes, n_kv_delta: int = 0) -> Path:
    """A copy of ``src`` with header bytes ``[start, end)`` replaced by ``new`` (a metadata entry changed, added
    or removed: ``n_kv_delta``), the tensor data copied after the re-padded header (tensor offsets are relative
    to it, so they stay valid)."""
    lay = layout(src, sample=0)
    with open(src, "rb") as f:
        raw = f.read(lay.data_offset)
        head = bytearray(raw[:start] + new + raw[end:lay.ti_end])
        struct.pack_into("<Q", head, 16, struct.unpack_from("<Q", head, 16)[0] + n_kv_delta)
        head += b"\0" * (-len(head) % lay.alignment)
        with open(dst, "wb") as out:
            out.write(head)
            shutil.copyfileobj(f, out, 16 << 20)  # the tensor data, unchanged
    return dst


def with_alignment_key(src: Path, dst: Path, alignment: int = 32) -> Path:
    """A copy of ``src`` that states ``general.alignment`` (the shipped file relies on the default, 32), so the
    alignment mutations have a value to hit."""
    lay = layout(src, sample=0)
    if "general.alignment" in lay.values:
        shutil.copyfile(src, dst)
        return dst
    key = b"general.alignment"
    entry = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, alignment)
    return splice(src, dst, lay.ti_start, lay.ti_start, entry, n_kv_delta=1)


def _pack_int(value: int, size: int) -> bytes:
    return (value % (1 << (8 * size))).to_bytes(size, "little")


def mutate(rng: random.Random, fields: list[Field], header: bytes, data_offset: int) -> tuple[list[tuple[int, bytes]], str]:
    """One mutant as in-place patches ``[(offset, bytes)]`` and a description; or ``[(-n, b"")]`` to truncate."""
    by_name = {f.name: f for f in fields}
    roll = rng.random()
    if roll < 0.04:  # truncation (a prefix of the file)
        cut = rng.choice([rng.randrange(0, 64), rng.randrange(0, data_offset), data_offset + rng.randrange(0, 4096)])
        return [(-cut, b"")], f"truncate at {cut}"
    if roll < 0.14:  # the values llama.cpp is known to assert on
        arch = by_name["general.architecture:value"]
        arch_name = header[arch.offset:arch.offset + arch.size].decode()
        choices = []
        if "general.alignment:value" in by_name:
            choices.append(("general.alignment:value", _pack_int(rng.choice([0, 1, 2, 3, 4, 8, 16, 24, 64]), 4)))
        for key, vals in ((f"{arch_name}.block_count:value", [0, 513, 2**31, 2**32 - 1, 1]),
                          (f"{arch_name}.attention.layer_norm_rms_epsilon:value", None),
                          (f"{arch_name}.attention.head_count:value", [0, 7, 2**31]),
                          (f"{arch_name}.attention.head_count_kv:value", [0, 7, 1000]),
                          (f"{arch_name}.embedding_length:value", [0, 1, 2**31]),
                          (f"{arch_name}.context_length:value", [0, 1, 2**31]),
                          (f"{arch_name}.rope.dimension_count:value", [0, 1, 65535]),
                          ("tokenizer.ggml.bos_token_id:value", [2**31, 2**32 - 1, 10**6]),
                          ("tokenizer.ggml.eos_token_id:value", [2**31, 2**32 - 1, 10**6])):
            if key in by_name:
                f = by_name[key]
                if vals is None:
                    choices.append((key, struct.pack("<f", rng.choice(INTERESTING_FLOATS))))
                else:
                    choices.append((key, _pack_int(rng.choice(vals), f.size)))
        if "tokenizer.ggml.model:value" in by_name:
            f = by_name["tokenizer.ggml.model:value"]
            word = rng.choice(["none", "no_vocab", "llama", "bert", "t5", "rwkv", "xxxx", "gpt2"]).encode()
            choices.append(("tokenizer.ggml.model:value", word[:f.size].ljust(f.size, b"x")))
        key, value = rng.choice(choices)
        return [(by_name[key].offset, value)], f"{key} = {value.hex()}"
    if roll < 0.22:  # a vocabulary entry's bytes changed (duplicates, empty-looking, invalid UTF-8)
        vocab = [f for f in fields if f.name.startswith("tokenizer.ggml.tokens[") and f.kind == "strbytes"]
        f = rng.choice(vocab)
        i = f.offset + rng.randrange(f.size)
        return [(i, bytes([rng.randrange(256)]))], f"{f.name} byte {i - f.offset} flipped"
    f = rng.choice(fields)
    if f.kind in ("u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "count", "strlen", "dims", "shape", "toff",
                  "type", "bool"):
        if rng.random() < 0.7:
            v = rng.choice(INTERESTING_INTS)
            v = -v if rng.random() < 0.2 else v
            if f.kind in ("shape", "toff", "strlen", "count") and rng.random() < 0.5:
                cur = int.from_bytes(header[f.offset:f.offset + f.size], "little")
                v = cur + rng.choice([-64, -32, -1, 1, 31, 32, 4096])
            return [(f.offset, _pack_int(v, f.size))], f"{f.name} = {v}"
        i = f.offset + rng.randrange(f.size)
        return [(i, bytes([header[i] ^ (1 << rng.randrange(8))]))], f"{f.name} bit flip at {i}"
    if f.kind in ("f32", "f64"):
        v = rng.choice(INTERESTING_FLOATS)
        return [(f.offset, struct.pack("<f" if f.size == 4 else "<d", v))], f"{f.name} = {v}"
    i = f.offset + rng.randrange(max(1, f.size))
    return [(i, bytes([rng.randrange(256)]))], f"{f.name} byte {i - f.offset} = random"


# -- the child: loads mutants until told to stop ---------------------------------------------------------------

def child_main() -> None:
    """Read a mutant path per line, answer one JSON line: outcome and detail."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.llama import LlamaEngine
    from ondevice.errors import OndeviceError
    from ondevice.models import gguf_check

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the answer channel
    for line in sys.stdin:
        path = line.strip()
        gguf_check._cache.clear()
        try:
            eng = LlamaEngine(path, EngineConfig(n_ctx=32, n_batch=32, n_ubatch=32, n_threads=1, warmup=False))
            try:
                bos = eng.bos_token
                eng.decode(bos if 0 <= bos < eng.n_vocab else 0)
                _ = eng.logits(-1)
                eng.tokenize("Hello, world")
            finally:
                eng.close()
            answer = {"outcome": "ran"}
        except OndeviceError as e:
            answer = {"outcome": "clean_error", "detail": str(e)[:300]}
        except Exception as e:  # noqa: BLE001 — exactly what the fuzzer counts
            answer = {"outcome": "traceback", "detail": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class Loader:
    """A child process that loads mutants; restarted after a crash or a hang."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, __file__, "--child"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def load(self, path: str) -> dict:
        import selectors

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(path + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(self.timeout)
        sel.close()
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"outcome": "hang", "detail": f"no answer in {self.timeout:g} s"}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return {"outcome": "crash", "detail": f"child exit {rc}" + (f" (signal {-rc})" if rc < 0 else "")}
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            # Something else wrote to the answer channel: native code dying writes there (ggml_abort's backtrace
            # runs gdb, which prints to the inherited stdout). Wait briefly for the child to say how it ends.
            try:
                rc = self.proc.wait(timeout=min(self.timeout, 30))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
                rc = None
            self.proc = None
            if rc is not None and rc != 0:
                return {"outcome": "crash", "detail": f"child exit {rc}" + (f" (signal {-rc})" if rc < 0 else "")
                        + f" after writing {line[:200]!r}"}
            return {"outcome": "traceback", "detail": f"unexpected loader output: {line[:300]!r}"}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


def run(source: Path, n: int, seed: int, timeout: float, workdir: Path, log=None,
        record: Path | None = None) -> tuple[Counter, list[dict]]:
    """Load ``n`` seeded mutants of ``source`` one by one; (counts by outcome, the non-clean cases). ``record``:
    a JSON-lines file that gets one line per mutant as it is done (counts survive an interrupted run)."""
    work = workdir / f"mutant-{os.getpid()}.gguf"
    base = with_alignment_key(source, workdir / f"base-{os.getpid()}.gguf")
    lay = layout(base)
    fields, data_offset = lay.fields, lay.data_offset
    header = base.read_bytes()[:data_offset]
    size = base.stat().st_size
    shutil.copyfile(base, work)
    small = workdir / f"truncated-{os.getpid()}.gguf"
    rng = random.Random(seed)
    loader = Loader(timeout)
    counts: Counter = Counter()
    bad: list[dict] = []
    try:
        with open(work, "r+b") as f:
            for i in range(n):
                patches, what = mutate(rng, fields, header, data_offset)
                if patches[0][0] < 0 or (patches[0][0] == 0 and patches[0][1] == b""):
                    cut = -patches[0][0]
                    with open(base, "rb") as src, open(small, "wb") as out:
                        out.write(src.read(cut))
                    res = loader.load(str(small))
                    if res["outcome"] == "hang":
                        slow = Loader(timeout * 10).load(str(small))
                        res = slow if slow["outcome"] != "hang" else res
                else:
                    for off, b in patches:
                        f.seek(off)
                        f.write(b)
                    f.flush()
                    res = loader.load(str(work))
                    if res["outcome"] == "hang":  # or a starved CPU: a hang must also outlast a 10x longer wait
                        slow = Loader(timeout * 10).load(str(work))
                        if slow["outcome"] != "hang":
                            res = {**slow, "detail": f"slow: over {timeout:g} s; " + slow.get("detail", "")}
                    for off, b in patches:  # restore the original bytes for the next mutant
                        f.seek(off)
                        f.write(header[off:off + len(b)])
                    f.flush()
                counts[res["outcome"]] += 1
                if record is not None:
                    with open(record, "a") as rec:
                        rec.write(json.dumps({"seed": seed, "i": i, "mutation": what, **res}) + "\n")
                if res["outcome"] not in ("clean_error", "ran"):
                    bad.append({"i": i, "mutation": what, "patches": [(o, b.hex()) for o, b in patches], **res})
                if log and (i + 1) % max(1, n // 20) == 0:
                    log(f"{i + 1}/{n} {dict(counts)}")
        assert work.stat().st_size == size
    finally:
        loader.close()
        for p in (work, small, base):
            p.unlink(missing_ok=True)
    return counts, bad


def replay(source: Path, seed: int, i: int, timeout: float, workdir: Path) -> dict:
    """Mutant ``i`` of the worker seeded ``seed`` (as the JSON-lines record names it), loaded again."""
    base = with_alignment_key(source, workdir / f"replay-{os.getpid()}.gguf")
    try:
        lay = layout(base)
        header = base.read_bytes()[:lay.data_offset]
        rng = random.Random(seed)
        for _ in range(i + 1):
            patches, what = mutate(rng, lay.fields, header, lay.data_offset)
        if patches[0][1] == b"":
            with open(base, "r+b") as f:
                f.truncate(-patches[0][0])
        else:
            with open(base, "r+b") as f:
                for off, b in patches:
                    f.seek(off)
                    f.write(b)
        loader = Loader(timeout)
        try:
            return {"mutation": what, **loader.load(str(base))}
        finally:
            loader.close()
    finally:
        base.unlink(missing_ok=True)


def default_source() -> Path:
    from ondevice.models import resolve

    return Path(resolve(None).path)


def _worker(args: tuple) -> tuple[Counter, list[dict]]:
    source, n, seed, timeout, workdir, record = args
    return run(Path(source), n, seed, timeout, Path(workdir), record=Path(record) if record else None,
               log=lambda m: print(f"[seed {seed}] {m}", file=sys.stderr, flush=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10000, help="mutants in all")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (each with its own loader child)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a load counts as a hang")
    ap.add_argument("--model", help="the GGUF to mutate (default: the shipped SmolLM2)")
    ap.add_argument("--json", metavar="PATH", help="write the counts and the bad cases here")
    ap.add_argument("--jsonl", metavar="PATH", help="append one line per mutant here as it is done")
    ap.add_argument("--replay", metavar="SEED:I", help="load mutant I of the worker seeded SEED again, and say how "
                                                       "it ends (a --jsonl line names both)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child_main()
        return 0
    source = Path(a.model) if a.model else default_source()
    workdir = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    if a.replay:
        seed, i = map(int, a.replay.split(":"))
        print(json.dumps(replay(source, seed, i, a.timeout, workdir)))
        return 0
    t0 = time.time()
    per = [a.n // a.workers + (i < a.n % a.workers) for i in range(a.workers)]
    jobs = [(str(source), k, a.seed * 1000 + i, a.timeout, str(workdir), a.jsonl) for i, k in enumerate(per) if k]
    print(f"fuzzing {source.name}: {a.n} mutants, {len(jobs)} workers, seed {a.seed}", file=sys.stderr)
    counts: Counter = Counter()
    bad: list[dict] = []
    if len(jobs) == 1:
        counts, bad = _worker(jobs[0])
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(jobs)) as pool:
            for c, b in pool.map(_worker, jobs):
                counts.update(c)
                bad += b
    dt = time.time() - t0
    print(f"\n{a.n} mutants of {source.name} in {dt:.0f} s (load average {os.getloadavg()[0]:.1f}):")
    for k in OUTCOMES:
        print(f"  {k:12s} {counts.get(k, 0)}")
    for b in bad[:50]:
        print(f"  {b['outcome']}: #{b['i']} {b['mutation']}: {b.get('detail', '')}")
    if a.json:
        Path(a.json).write_text(json.dumps({"n": a.n, "seed": a.seed, "seconds": dt, "counts": dict(counts),
                                            "bad": bad}, indent=1))
    return 1 if any(counts.get(k) for k in ("crash", "hang", "traceback")) else 0


if __name__ == "__main__":
    sys.exit(main())
