"""``ondevice quantize MODEL --type T``: make a quantized variant with llama.cpp and store it."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="catalog name, stored variant or .gguf path")
    p.add_argument("--type", "-t", required=True,
                   help="llama.cpp file type: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_M, Q5_K_M, Q6_K, F16, BF16, "
                        "F32, ... or its number, as llama-quantize takes it (`--type list` shows all)")
    p.add_argument("--name", "-n", default=None, help="variant name (default: <model>-<type>)")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=TYPE",
                   help="per-tensor ggml type for tensors whose name matches REGEX (repeatable; first match wins)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow a source that is already quantized (quality loss compounds)")
    p.add_argument("--threads", type=int, default=None, help="quantization threads (default: physical cores)")
    p.add_argument("--imatrix", default=None, metavar="FILE.npz",
                   help="importance matrix (tensor name -> per-column mean squared activation), as "
                        "`ondevice fit` collects; weights each column's rounding error")
    p.add_argument("--force", action="store_true", help="replace an existing variant of the same name")


def run(args: argparse.Namespace) -> int:
    from .quantize import ftypes

    if args.type.lower() == "list":
        for name, value in ftypes().items():
            print(f"{name:12s} {value}")
        return 0
    if args.type.strip().isdigit():  # llama-quantize's numbers, as `--type list` shows them: 15 is Q4_K_M
        by_id = {v: k for k, v in ftypes().items()}
        if int(args.type) not in by_id:
            from ..errors import InvalidArgument

            raise InvalidArgument(f"--type {args.type} is no llama.cpp file type number; `--type list` shows them")
        args.type = by_id[int(args.type)]
    from .api import quantize

    ref = quantize(args.model, args.type, args.name, args.override, allow_requantize=args.allow_requantize,
                   threads=args.threads, force=args.force, imatrix=args.imatrix)
    prov = (ref.provenance or {}).get("provenance", {})
    check = prov.get("tensor_types", {})
    mix = ", ".join(f"{t} {n}" for t, n in check.get("quant_mix", {}).items())
    print(f"{ref.name}: {ref.path} ({prov.get('file_size', 0) / 1e6:.1f} MB, {prov.get('seconds', 0):.1f} s)")
    print(f"  matrices: {mix}")
    for pat, hit in check.get("overrides", {}).items():
        print(f"  override {pat}={hit['type']}: {hit['tensors']} tensors -> {hit['got']}")
    for w in check.get("warnings", []):
        print(f"  warning: {w}", file=sys.stderr)
    return 0
