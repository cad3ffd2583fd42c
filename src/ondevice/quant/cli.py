"""``ondevice quantize MODEL --type T``: make a quantized variant with llama.cpp and store it."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="catalog name, stored variant or .gguf path")
    p.add_argument("rest", nargs="*", metavar="[OUTPUT] [TYPE] [THREADS]",
                   help="llama-quantize's order also works: `ondevice quantize in.gguf out.gguf Q4_K_M 2`")
    p.add_argument("--type", "-t", default=None,
                   help="llama.cpp file type: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_M, Q5_K_M, Q6_K, F16, BF16, "
                        "F32, ... or its number, as llama-quantize takes it (`--type list` shows all); COPY: "
                        "the tensors as they are (one file from a split model)")
    p.add_argument("--name", "-n", default=None, help="variant name (default: <model>-<type>)")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="write the quantized model to FILE instead of storing it as a variant")
    p.add_argument("--override", "--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="per-tensor ggml type for tensors whose name matches REGEX (repeatable; first match wins; "
                        "llama-quantize's --tensor-type)")
    g = p.add_argument_group("llama-quantize's flags for the output and embedding tensors (as --override of them)")
    g.add_argument("--output-tensor-type", metavar="TYPE", help="the ggml type of output.weight")
    g.add_argument("--token-embedding-type", metavar="TYPE", help="the ggml type of token_embd.weight")
    g.add_argument("--leave-output-tensor", action="store_true", help="output.weight keeps its type in the source")
    from ..engine.llama_flags import Refused

    for names, why in _NOT_TAKEN.items():
        p.add_argument(*names, nargs="?", action=Refused, why=why, tool="llama-quantize", help=argparse.SUPPRESS)
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow a source that is already quantized (quality loss compounds)")
    p.add_argument("--threads", type=int, default=None, help="quantization threads (default: physical cores)")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="importance matrix (tensor name -> per-column mean squared activation) that weights each "
                        "column's rounding error: the .npz `ondevice fit` collects, or llama-imatrix's imatrix.gguf "
                        "or legacy .dat")
    p.add_argument("--force", action="store_true", help="replace an existing variant of the same name, or an existing "
                   "output file (llama-quantize overwrites it; here it is kept unless --force)")


_NOT_TAKEN = {  # llama-quantize's flags that are not taken here, and why
    ("--pure",): "the type's own mix of tensor types is used; give per-tensor types with --override REGEX=TYPE",
    ("--keep-split",): "the output is one file (`ondevice quantize FIRST.gguf OUT.gguf COPY` merges a split model)",
    ("--override-kv",): "the metadata is copied as it is",
    ("--include-weights", "--exclude-weights"): "--imatrix weights every tensor it holds",
    ("--prune-layers",): "every layer is kept",
}


def _tensor_overrides(args: argparse.Namespace) -> list[str]:
    """llama-quantize's --output-tensor-type, --token-embedding-type and --leave-output-tensor as overrides (first:
    they name one tensor each), then --override's."""
    from ..errors import InvalidArgument

    if args.leave_output_tensor and args.output_tensor_type:
        raise InvalidArgument("--leave-output-tensor and --output-tensor-type both set output.weight's type; give one")
    from .quantize import is_weight_type, weight_types_hint

    for flag, typ in (("--output-tensor-type", args.output_tensor_type), ("--token-embedding-type",
                                                                           args.token_embedding_type)):
        if typ is not None and not is_weight_type(typ):
            raise InvalidArgument(f"{flag} {typ}: not a type llama.cpp quantizes weights to; {weight_types_hint()}")
    first = []
    if args.leave_output_tensor or args.output_tensor_type:
        from ..models import resolve

        types = {t.name: t.type_name for t in resolve(args.model).info.tensors}
        if "output.weight" in types:
            first.append(f"^output\\.weight$={args.output_tensor_type or types['output.weight']}")
        elif not args.token_embedding_type:  # tied: the token embedding is the output, and takes its type (as
            kept = types.get("token_embd.weight")  # llama-quantize gives it) unless --token-embedding-type says
            first.append(f"^token_embd\\.weight$={args.output_tensor_type or kept}")
    if args.token_embedding_type:
        first.append(f"^token_embd\\.weight$={args.token_embedding_type}")
    return first + list(args.override)


def _read_positionals(args: argparse.Namespace) -> None:
    """llama-quantize's ``MODEL [OUTPUT] TYPE [THREADS]`` into --output, --type and --threads."""
    from ..errors import InvalidArgument
    from .quantize import check_not_repacked_type, file_type

    rest = list(args.rest)
    if args.type is None:
        at = next((i for i, w in enumerate(rest) if w.lower() == "list" or file_type(w)), None)
        if at is None:
            for w in rest:
                check_not_repacked_type(w)
            said = f"{' '.join(rest)!r} names no llama.cpp file type" if rest else "no file type given"
            raise InvalidArgument(f"{said}: give --type Q4_K_M (or after the model, as llama-quantize takes it: "
                                  "MODEL [OUTPUT] TYPE); `--type list` shows them")
        args.type, before, after = rest[at], rest[:at], rest[at + 1:]
    else:
        before, after = rest, []
    # a word before the type that is no output file is a type misspelled: `MODEL Q4_KM 2` read 2 as the type
    # (Q4_0) and wrote it to a file named Q4_KM
    odd = before[1:] if len(before) > 1 else [w for w in before if not (w.lower().endswith(".gguf") or "/" in w)]
    if odd and args.output is None:
        raise InvalidArgument(f"{odd[0]!r} is not a llama.cpp file type (`--type list` shows them), nor an output "
                              f"file (a name ending .gguf, or a path): give MODEL [OUTPUT.gguf] TYPE [THREADS]")
    if after and after[0].isdigit():
        if args.threads is not None:
            raise InvalidArgument(f"threads given twice ({after[0]} after the type and --threads {args.threads}); "
                                  f"give one of them")
        args.threads = int(after.pop(0))
    if len(before) == 1 and args.output is None:
        args.output = before.pop()
    if before or after:
        raise InvalidArgument(f"cannot read {' '.join(before + after)!r} after the model: give MODEL [OUTPUT] TYPE "
                              "[THREADS] as llama-quantize takes them, or --output, --type and --threads")


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidArgument
    from .quantize import COPY, file_type, ftypes

    if args.type is not None and args.type.strip().isdigit() and "-t" in getattr(args, "typed", set()):
        raise InvalidArgument(f"-t {args.type}: quantize's -t is the file type, not the threads as in the other "
                              f"verbs; threads are --threads {args.type} (or the number after the type, as "
                              f"llama-quantize takes it); a type number goes after the model: MODEL OUT {args.type}")
    if args.model is None and (args.type or "").lower() != "list":
        raise InvalidArgument("give the model to quantize: ondevice quantize MODEL --type Q4_K_M (`ondevice "
                              "quantize --type list` shows the types)")
    _read_positionals(args)
    if args.type.lower() == "list":
        for name, value in ftypes().items():
            print(f"{name:12s} {value}")
        print(f"{COPY:12s} -  every tensor as it is, into one file (a split model merged)")
        return 0
    if file_type(args.type) is None and args.type.strip().isdigit():  # 15 is Q4_K_M, as `--type list` shows
        raise InvalidArgument(f"--type {args.type} is no llama.cpp file type number; `--type list` shows them")
    args.type = file_type(args.type) or args.type  # an unknown name: quantize() says what is wrong with it
    from .api import quantize

    ref = quantize(args.model, args.type, args.name, _tensor_overrides(args), allow_requantize=args.allow_requantize,
                   threads=args.threads, force=args.force, imatrix=args.imatrix, output=args.output)
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
