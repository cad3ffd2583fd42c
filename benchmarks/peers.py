"""Build llama.cpp's own tools from the llama.cpp that llama-cpp-python 0.3.36 vendors, to use as peers.

Benchmarks compare `ondevice` (through llama-cpp-python) against llama.cpp's reference tools built from
the *same* vendored sources, so a ratio between the two measures our overhead, not a version gap.

Layout (outside the repo)::

    ${ONDEVICE_PEERS_DIR:-~/.cache/ondevice-peers}/llama.cpp-0.3.36/
        llama_cpp_python-0.3.36.tar.gz     # the sdist (downloaded with pip when missing)
        src/llama_cpp_python-0.3.36/       # extracted; vendor/llama.cpp is the cmake source dir
        build/bin/llama-bench ...          # the tools
        build/ondevice-build.json          # what was built, how, and how long it took
        .lock                              # flock so two callers never build at once

Usage::

    python benchmarks/peers.py build [--sdist PATH] [--jobs 2]
    python benchmarks/peers.py info
    python benchmarks/peers.py path llama-bench

Library use: ``ensure_tool("llama-bench") -> Path`` (builds once; later calls return at once), and
``kernel_match(model)``: the one CPU-kernel choice both sides of a comparison use (see its docstring).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
TOOLS = ("llama-bench", "llama-server", "llama-batched-bench", "llama-perplexity", "llama-cli")

# Option names checked against vendor/llama.cpp/CMakeLists.txt of 0.3.36:
# - LLAMA_CURL is deprecated there (llama_option_depr WARNING) and HTTPS goes through LLAMA_OPENSSL; both off
#   because the peers only read local files.
# - The server's web UI would otherwise be fetched from a Hugging Face bucket at build time
#   (LLAMA_USE_PREBUILT_UI=ON by default); the hubs are unreachable and the benchmarks need no UI.
# - Static libs so the binaries do not depend on where the build dir sits.
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_EXAMPLES=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)


class PeerBuildError(RuntimeError):
    """The peer tools could not be fetched or built; the message says what to do."""


def peers_root() -> Path:
    """Root of this version's peer cache (``ONDEVICE_PEERS_DIR`` overrides the parent)."""
    base = os.environ.get("ONDEVICE_PEERS_DIR") or "~/.cache/ondevice-peers"
    return Path(base).expanduser() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def bin_dir() -> Path:
    return peers_root() / "build" / "bin"


def tool_path(name: str) -> Path:
    """Where tool ``name`` lives once built (it may not exist yet)."""
    _check_tool(name)
    return bin_dir() / name


def _check_tool(name: str) -> None:
    if name not in TOOLS:
        raise ValueError(f"unknown peer tool {name!r}; choose one of {', '.join(TOOLS)}")


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``root/.lock`` (blocks while another process builds)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_or_download_sdist(root: Path, sdist: Path | None) -> Path:
    """Return a path to the sdist tarball: the given one, a cached one, or a fresh ``pip download``."""
    if sdist is None and os.environ.get("ONDEVICE_LLAMA_SDIST"):
        sdist = Path(os.environ["ONDEVICE_LLAMA_SDIST"])
    if sdist is not None:
        if not sdist.is_file():
            raise PeerBuildError(f"sdist {sdist} does not exist; pass an existing .tar.gz or omit --sdist")
        return sdist
    cached = root / f"{SDIST_NAME}.tar.gz"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            "-d",
            tmp,
        ]
        print("+", " ".join(cmd), file=sys.stderr)
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        got = Path(tmp) / cached.name
        if res.returncode != 0 or not got.is_file():
            raise PeerBuildError(
                f"pip download of llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} failed "
                f"(exit {res.returncode}): {res.stderr.strip()[-800:]}\n"
                "fix: check access to PyPI, or download the sdist yourself and pass --sdist PATH "
                "(or set ONDEVICE_LLAMA_SDIST)"
            )
        os.replace(got, cached)  # same filesystem: atomic
    return cached


def _extract(sdist: Path, root: Path) -> Path:
    """Extract the sdist once under ``root/src`` and return vendor/llama.cpp."""
    src_parent = root / "src"
    source = src_parent / SDIST_NAME / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    src_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src_parent) as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        extracted = Path(tmp) / SDIST_NAME
        if not (extracted / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise PeerBuildError(f"{sdist} has no vendor/llama.cpp; is it the llama-cpp-python sdist?")
        final = src_parent / SDIST_NAME
        if final.exists():
            shutil.rmtree(final)  # a half-extracted leftover from an interrupted run
        os.replace(extracted, final)
    return source


def _run(cmd: list[str], log: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    with open(log, "a") as fh:
        fh.write("+ " + " ".join(cmd) + "\n")
        fh.flush()
        res = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise PeerBuildError(
            f"command failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}\nfull log: {log}"
        )


def build(
    tools: tuple[str, ...] = TOOLS, *, sdist: Path | None = None, jobs: int = 2, force: bool = False
) -> dict:
    """Build ``tools`` (idempotent, serialised by a file lock) and return the build record."""
    for t in tools:
        _check_tool(t)
    root = peers_root()
    with _locked(root):
        build_dir = root / "build"
        record_path = build_dir / "ondevice-build.json"
        missing = [t for t in tools if not (bin_dir() / t).is_file()]
        if not missing and not force and record_path.is_file():
            return json.loads(record_path.read_text())
        source = _extract(_find_or_download_sdist(root, sdist), root)
        build_dir.mkdir(parents=True, exist_ok=True)
        log = build_dir / "ondevice-build.log"
        t0 = time.monotonic()
        if not (build_dir / "CMakeCache.txt").is_file() or force:
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", str(source), "-B", str(build_dir), *gen, *CMAKE_ARGS], log)
        t_conf = time.monotonic() - t0
        targets = list(tools) if force else missing or list(tools)
        _run(
            [
                "cmake",
                "--build",
                str(build_dir),
                "--config",
                "Release",
                "-j",
                str(jobs),
                "--target",
                *targets,
            ],
            log,
        )
        t_build = time.monotonic() - t0 - t_conf
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        record.update(
            llama_cpp_python=LLAMA_CPP_PYTHON_VERSION,
            source=str(source),
            cmake_args=list(CMAKE_ARGS),
            jobs=jobs,
            tools={t: str(bin_dir() / t) for t in TOOLS if (bin_dir() / t).is_file()},
            build_info=_build_info_from_source(source),
        )
        record.setdefault("builds", []).append(
            {
                "targets": targets,
                "configure_s": round(t_conf, 1),
                "build_s": round(t_build, 1),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        tmp = record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, record_path)
        for t in tools:
            if not (bin_dir() / t).is_file():
                raise PeerBuildError(f"build finished but {bin_dir() / t} is missing; see {log}")
        return record


def ensure_tool(name: str, *, sdist: Path | None = None, jobs: int = 2) -> Path:
    """Path to llama.cpp tool ``name``, building all peer tools on first use."""
    path = tool_path(name)
    if path.is_file():
        return path
    build(TOOLS, sdist=sdist, jobs=jobs)
    return path


def _git(source: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", "-C", str(source), *args], check=False, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def _build_info_from_source(source: Path) -> dict:
    """Commit (and build number when the history is complete) of the vendored llama.cpp."""
    info: dict = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION}
    try:  # set(LLAMA_VERSION_MAJOR 0) ... in the top CMakeLists
        cm = (source / "CMakeLists.txt").read_text()
        parts = [re.search(rf"set\(LLAMA_VERSION_{k} (\d+)\)", cm) for k in ("MAJOR", "MINOR", "PATCH")]
        if all(parts):
            info["llama_cpp_version"] = ".".join(m.group(1) for m in parts if m)
    except OSError:
        pass
    # The sdist ships the submodule's git dir (vendor/llama.cpp/.git -> ../../.git/modules/...).
    commit = _git(source, "rev-parse", "HEAD")
    if commit:
        info["commit"] = commit
        info["commit_date"] = _git(source, "log", "-1", "--format=%cI")
        # llama.cpp's build number is `git rev-list --count HEAD`; a shallow clone makes that 1, which
        # would be a wrong "b1", so only report it for a full history.
        if _git(source, "rev-parse", "--is-shallow-repository") == "false":
            count = _git(source, "rev-list", "--count", "HEAD")
            info["build_number"] = int(count) if count and count.isdigit() else None
        else:
            info["build_number"] = None
            # The tools built from it print "b1" / build_number 1 for the same reason.
            info["note"] = "vendored git history is shallow; build number unknown (the tools report b1)"
    else:
        info["commit"] = None
        info["note"] = "no git metadata in the vendored sources; only the package version is known"
    return info


def llama_cpp_build_info() -> dict:
    """What llama.cpp the peers (and llama-cpp-python 0.3.36) are built from.

    Reads the extracted sources if present (git metadata, version in CMakeLists), else the build record,
    else gives just the llama-cpp-python version. Never downloads or builds.
    """
    root = peers_root()
    source = root / "src" / SDIST_NAME / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return _build_info_from_source(source)
    record = root / "build" / "ondevice-build.json"
    if record.is_file():
        info = json.loads(record.read_text()).get("build_info")
        if info:
            return info
    return {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "commit": None,
        "note": "peer sources not fetched yet; run `python benchmarks/peers.py build`",
    }


@dataclass(frozen=True)
class KernelMatch:
    """One extra-CPU-kernel choice for ondevice and the llama.cpp peers of a comparison."""

    repack: int  # llama-bench --repack N; llama-server / llama-batched-bench --repack / --no-repack (LLAMA_ARG_REPACK)
    env: dict  # ONDEVICE_AMX / ONDEVICE_REPACK that give ondevice the same kernels
    kernels: str  # the extra buffer types both sides load ("none": plain CPU)
    note: str | None  # why the choice differs from ondevice's own, when it does

    def apply(self) -> None:
        """ondevice in this process and in the processes it starts uses the matched kernels."""
        os.environ.update(self.env)

    @property
    def server_flag(self) -> str:
        return "--repack" if self.repack else "--no-repack"

    def describe(self) -> str:
        return f"kernels: {self.kernels} on both sides (peers --repack {self.repack})" + (
            f"; {self.note}" if self.note else "")


def kernel_match(model: str | Path, amx: str | None = None, repack: str | None = None) -> KernelMatch:
    """ondevice's kernel choice for ``model`` here (flags, ONDEVICE_* env, self-test cache), made expressible by
    the peers. llama.cpp's tools have one switch, ``--repack 0|1`` (``use_extra_bufts``): all of the build's
    extra buffer types or none. When ondevice's choice is all or none, both sides use it; when it is a part
    (CPU_REPACK without AMX on an AMX Xeon, where the tools' --repack 1 would load the crashing AMX kernels),
    both sides run without extra kernels and the note says so. The peers are built from the same sources with
    GGML_NATIVE, so they offer the same buffer types as llama-cpp-python's build on this machine."""
    from ondevice.device.kernels import label, resolve
    from ondevice.engine.bufts import offered

    choice, names = resolve(amx, repack, model), offered()
    note = None
    if choice.bufts and choice.bufts != names:
        note = (f"ondevice would use {label(choice.bufts)}, which llama.cpp's tools cannot select (their --repack 1 "
                f"also loads {label(tuple(n for n in names if n not in choice.bufts))})")
        choice_bufts: tuple[str, ...] = ()
    else:
        choice_bufts = choice.bufts
    on = bool(choice_bufts)
    env = {"ONDEVICE_AMX": "on" if on and "AMX" in names else "off",
           "ONDEVICE_REPACK": "on" if on and any(n != "AMX" for n in names) else "off"}
    return KernelMatch(repack=int(on), env=env, kernels=label(choice_bufts), note=note)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch the sdist if needed and build the peer tools")
    b.add_argument("--sdist", type=Path, help="use this llama-cpp-python sdist instead of downloading it")
    b.add_argument("--jobs", "-j", type=int, default=2)
    b.add_argument("--force", action="store_true", help="reconfigure and rebuild")
    b.add_argument("tools", nargs="*", default=list(TOOLS), help=f"subset of {', '.join(TOOLS)}")
    sub.add_parser("info", help="print the vendored llama.cpp build info")
    pp = sub.add_parser("path", help="print a tool's path (building it if needed)")
    pp.add_argument("tool", choices=TOOLS)
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            record = build(tuple(args.tools), sdist=args.sdist, jobs=args.jobs, force=args.force)
            print(json.dumps(record, indent=2))
        elif args.cmd == "info":
            print(json.dumps(llama_cpp_build_info(), indent=2))
        else:
            print(ensure_tool(args.tool))
    except (PeerBuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
