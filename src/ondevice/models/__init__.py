"""Names -> GGUF files: the embedded catalog, the store, local paths and hub pulls; GGUF validation.

    >>> from ondevice.models import resolve
    >>> ref = resolve()                     # the default embedded SmolLM2-135M-Instruct
    >>> ref.info.architecture, ref.info.params_label, ref.info.quant_summary
    ('llama', '134.5M', 'Q4_1 69%, Q8_0 31%')
"""

from __future__ import annotations

from .catalog import (
    CATALOG,
    DEFAULT_MODEL,
    CatalogEntry,
    ModelListing,
    ModelRef,
    list_models,
    read_provenance,
    register_variant,
    remove_variant,
    resolve,
)
from .gguf_check import GGUFInfo, TensorInfo, format_count, validate_gguf
from .hub import DownloadInterrupted, pull
from .store import atomic_path, atomic_write, data_dir, home, models_dir, sha256_file, write_json

__all__ = [
    "CATALOG", "DEFAULT_MODEL", "CatalogEntry", "DownloadInterrupted", "GGUFInfo", "ModelListing", "ModelRef",
    "TensorInfo", "atomic_path", "atomic_write", "data_dir", "format_count", "home", "list_models",
    "models_dir", "pull", "read_provenance", "register_variant", "remove_variant", "resolve", "sha256_file",
    "validate_gguf", "write_json",
]
