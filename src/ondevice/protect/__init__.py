"""Encrypted model files, decrypted only in memory (TZ-LLM's protected parameters, without the TEE).

    >>> import ondevice.protect as protect
    >>> key = protect.keygen()                                   # 64 hex digits; keep it secret
    >>> protect.encrypt(None, "smollm2.enc", "env:MY_KEY")       # MY_KEY holds the key
    >>> model = ondevice.load("./smollm2.enc", key_source="env:MY_KEY")

The container is :mod:`.container`, keys come from :mod:`.keys`, the memfd restore is :mod:`.restore`
and its hand-over to llama.cpp :mod:`.load`. The threat model is in the README.
"""

from __future__ import annotations

from .api import encrypt, info, keygen, model_info, verify
from .container import ProtectError, is_container, read_header
from .keys import add_key_args, apply_key_args, key_source_from, load_key

__all__ = ["ProtectError", "add_key_args", "apply_key_args", "encrypt", "info", "is_container", "key_source_from", "keygen",
           "load_key", "model_info", "read_header", "verify"]
