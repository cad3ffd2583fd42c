"""Where a model key comes from: an environment variable, a file, or the OS keyring — never argv.

A *key source* is a short spec that names where the key is, not the key: ``env:NAME``, ``file:PATH`` or
``keyring:NAME``. Specs are safe to keep in settings and records. The CLI's flags become the process's
``ONDEVICE_KEY_SOURCE`` (as the kernel flags become ``ONDEVICE_AMX``), so every load finds the key, bench
workers included: they inherit the environment, and the key is read only in the process that loads the
model, never passed on a command line.

Key text is 64 hex digits (what ``ondevice protect keygen`` prints) or 32 bytes in base64; a key file may
also hold the 32 raw bytes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import os
import secrets
import shlex

from ..capped import read_capped, size_text
from ..errors import InvalidArgument, OndeviceError

SOURCE_ENV = "ONDEVICE_KEY_SOURCE"  # the key source the flags chose, for every load in this process and its workers
DEFAULT_ENV = "ONDEVICE_MODEL_KEY"  # the key itself, used when no key source is given at all
KEYRING_SERVICE = "ondevice"
KEY_FILE_LIMIT = 4096  # bytes: a key file holds 32 bytes or their text (a line of hex or base64, a comment)
_FIX_FLAGS = "give the key with --key-env NAME, --key-file PATH or --key-keyring NAME (or set ONDEVICE_MODEL_KEY)"
_FIX_PYTHON = ('say where the key is with key_source="env:NAME", "file:PATH" or "keyring:NAME" (ondevice.load(path, '
               'key_source="env:MODEL_KEY")), or set ONDEVICE_MODEL_KEY')
# key_source_from sets it: the command line read its key flags, so a key's errors name those flags rather than
# key_source (a process-wide mark, as models.sources.PULL_ON_USE is the command line's)
COMMAND_LINE = False


def add_key_args(p: argparse.ArgumentParser) -> None:
    """The key flags of every verb that loads a model (one declaration)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--key-env", metavar="NAME", default=None,
                   help="encrypted model: the environment variable that holds its key")
    g.add_argument("--key-file", metavar="PATH", default=None, help="encrypted model: a file that holds its key")
    g.add_argument("--key-keyring", metavar="NAME", default=None,
                   help="encrypted model: its key's name in the OS keyring (service 'ondevice')")


def key_source_from(args: argparse.Namespace) -> str | None:
    """The key source spec named by the flags of :func:`add_key_args` (None: none given)."""
    global COMMAND_LINE
    COMMAND_LINE = True
    for kind in ("env", "file", "keyring"):
        v = getattr(args, f"key_{kind}", None)
        if v and kind == "file" and not os.path.exists(os.path.expanduser(v)):
            _refuse_key_as_name(kind, v)  # before it becomes an absolute path: a base64 key may hold "/"
        if v:
            return f"{kind}:{os.path.abspath(os.path.expanduser(v)) if kind == 'file' else v}"
    return None


def apply_key_args(args: argparse.Namespace) -> None:
    """Make the flags' key source the process's ``ONDEVICE_KEY_SOURCE`` (a spec, never the key), so every
    load in it and in its workers (bench runs each configuration in a subprocess) finds the key."""
    source = key_source_from(args)
    if source is None:
        return
    if source.startswith(("env:", "file:")):  # read now: a key flag given in vain is an error, not ignored
        load_key(source)
    os.environ[SOURCE_ENV] = source


def parse_key(text: str | bytes, where: str) -> bytes:
    """32 key bytes from hex, base64 or (bytes only) raw form."""
    if isinstance(text, bytes):
        if len(text) == 32:
            return text
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidArgument(f"{where} does not hold a key: expected 32 raw bytes, 64 hex digits or base64 "
                                  f"(make one with `ondevice protect keygen`)") from None
    t = text.strip()
    try:
        key = bytes.fromhex(t) if len(t) == 64 else base64.b64decode(t + "=" * (-len(t) % 4),
                                                                     altchars=b"-_" if "-" in t or "_" in t else None,
                                                                     validate=True)
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != 32:
        raise InvalidArgument(f"{where} does not hold a 256-bit key: expected 64 hex digits or base64 of 32 "
                              f"bytes (make one with `ondevice protect keygen`)")
    return key


def _refuse_key_as_name(kind: str, name: str) -> None:
    """Raise, without showing it, if the name that was not found is a key itself (``--key-env $MODEL_KEY``)."""
    try:
        parse_key(name, "")
    except InvalidArgument:
        return  # an ordinary name: the caller's message may show it
    flag = f"--key-{kind}"
    what = {"env": "NAME of the variable that holds it (--key-env MODEL_KEY, not --key-env $MODEL_KEY)",
            "file": "PATH of a file that holds it", "keyring": "NAME of its keyring entry"}[kind]
    raise InvalidArgument(f"{flag} was given a key itself ({len(name)} characters, not shown), not where the key "
                          f"is: give {flag} the {what}; it was on a command line (shell history, ps), so "
                          f"consider it exposed")


def _warn_if_others_can_read(path: str) -> None:
    """A key file that other users can read protects nothing (as ssh says of a private key)."""
    import stat
    import warnings

    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.warn(f"key file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
                          f"restrict it with: chmod 600 {shlex.quote(path)}", stacklevel=2)


def new_key() -> str:
    """A fresh random 256-bit key as 64 hex digits."""
    return secrets.token_hex(32)


def _keyring():
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        raise OndeviceError("the OS keyring needs the 'keyring' package: pip install 'ondevice[protect]'") from None
    kr = keyring.get_keyring()
    if isinstance(kr, fail.Keyring) or type(kr).__name__ == "ChainerBackend" and not getattr(kr, "backends", None):
        raise OndeviceError("no OS keyring backend is available on this machine (keyring found none: no Secret "
                            "Service, KWallet or macOS Keychain); use --key-env NAME or --key-file PATH instead")
    return keyring


def refuse_keyring_overwrite(name: str) -> None:
    """Raise if the keyring entry ``name`` already holds a key: it is usually the only copy of the key that opens
    the containers made with it, so replacing it unasked would lock them for good (as ``keygen -o`` refuses)."""
    if _keyring().get_password(KEYRING_SERVICE, name) is not None:
        raise InvalidArgument(f"--keyring {name}: the OS keyring already holds a key under '{name}' (service "
                              f"'{KEYRING_SERVICE}'); replacing it makes every container encrypted with it "
                              f"unreadable for good; pass --force to replace it, or choose another NAME")


def store_in_keyring(name: str, key_text: str, *, force: bool = False) -> None:
    """Store a key under ``name``; an existing entry is replaced only with ``force``."""
    if not force:
        refuse_keyring_overwrite(name)
    _keyring().set_password(KEYRING_SERVICE, name, key_text)


def _given(kind: str, name: str) -> str:
    """A key source as its user gave it: the flag on the command line, the spec in Python."""
    return f"--key-{kind} {name}" if COMMAND_LINE else f'key_source "{kind}:{name}"'


def load_key(source: str | None, why: str = "this model is encrypted") -> bytes:
    """The key named by a source spec (None: ``ONDEVICE_KEY_SOURCE``'s spec, else ``ONDEVICE_MODEL_KEY``);
    ``why`` a key is needed, for the message when none is given.

    Raises:
        OndeviceError: no source and no default, an unset variable, a missing file, no keyring, a malformed key.
    """
    if source is None:
        source = os.environ.get(SOURCE_ENV) or None
    if source is None:
        if os.environ.get(DEFAULT_ENV):
            source = f"env:{DEFAULT_ENV}"
        else:
            raise OndeviceError(f"{why}; {_FIX_FLAGS if COMMAND_LINE else _FIX_PYTHON}")
    if not isinstance(source, str) or (":" not in source and len(source) >= 16):
        # probably the key itself, passed where its source belongs: never shown, not even in part
        what = "characters" if isinstance(source, str) else type(source).__name__
        size = f"{len(source)} {what}" if hasattr(source, "__len__") else what
        raise InvalidArgument(f"the key source ({size}, not shown: it may be the key itself) is not env:NAME, "
                              f"file:PATH or keyring:NAME; give where the key is, never the key")
    kind, _, name = source.partition(":")
    if kind == "env":
        val = os.environ.get(name)
        if not val:
            _refuse_key_as_name("env", name)
            raise OndeviceError(f"{_given('env', name)}: the environment variable {name} is not set (or empty); "
                                f"export it with the model's key")
        return parse_key(val, f"environment variable {name}")
    if kind == "file":
        try:
            data = read_capped(name, KEY_FILE_LIMIT)  # a key is 32 bytes or their text: `/dev/zero` is no key
        except OSError as e:
            for part in (name, os.path.basename(name)):  # a base64 key may hold "/": it is not a path then
                _refuse_key_as_name("file", part)
            raise OndeviceError(f"{_given('file', name)}: cannot read it ({e.strerror}); check the path") from None
        if data is None:
            raise OndeviceError(f"{_given('file', name)}: over {size_text(KEY_FILE_LIMIT)}, not a key file (a key is "
                                f"32 bytes, or their hex or base64 text); give the file `ondevice protect keygen -o` "
                                f"wrote")
        _warn_if_others_can_read(name)
        return parse_key(data if len(data) == 32 else data.strip(), f"key file {name}")
    if kind == "keyring":
        val = _keyring().get_password(KEYRING_SERVICE, name)
        if val is None:
            _refuse_key_as_name("keyring", name)
            raise OndeviceError(f"{_given('keyring', name)}: no such key in the OS keyring (service "
                                f"'{KEYRING_SERVICE}'); store one with `ondevice protect keygen --keyring {name}`")
        return parse_key(val, f"keyring entry {name}")
    raise InvalidArgument(f"key source {source!r} is not env:NAME, file:PATH or keyring:NAME")
