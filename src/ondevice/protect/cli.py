"""``ondevice protect keygen|encrypt|info|verify``: encrypted model files, decrypted only in memory."""

from __future__ import annotations

import argparse
import json
import shlex


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .keys import add_key_args

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    k = sub.add_parser("keygen", help="print a new random 256-bit key (its last line)")
    k.add_argument("--keyring", metavar="NAME", help="also store it in the OS keyring under NAME")
    k.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (mode 0600) instead of printing it")
    k.add_argument("--force", action="store_true", help="replace an existing -o file or --keyring entry")
    e = sub.add_parser("encrypt", help="write an encrypted container of a model")
    e.add_argument("model", help="catalog name, stored variant or .gguf path")
    e.add_argument("-o", "--output", required=True, metavar="FILE", help="the container to write")
    e.add_argument("--chunk-size", type=int, default=1 << 20, help="plaintext bytes per authenticated chunk")
    e.add_argument("--force", action="store_true", help="replace an existing -o file")
    add_key_args(e)
    i = sub.add_parser("info", help="format version and sizes of a container (no key needed)")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="one JSON object")
    v = sub.add_parser("verify", help="authenticate every chunk of a container with its key")
    v.add_argument("file")
    add_key_args(v)


def run(args: argparse.Namespace) -> int:
    from . import api
    from .keys import key_source_from

    if args.action == "keygen":
        key = api.keygen(args.keyring, args.output, force=args.force)
        where = [f"the OS keyring as '{args.keyring}' (use --key-keyring {args.keyring})"] if args.keyring else []
        if args.output:
            where.append(f"{args.output}, readable only by you (use --key-file {shlex.quote(args.output)})")
            print(f"stored in {' and in '.join(where)}")
            return 0
        if where:
            print(f"stored in {where[0]}; the key:")
        print(key)
        return 0
    if args.action == "encrypt":
        h = api.encrypt(args.model, args.output, key_source_from(args), chunk_size=args.chunk_size,
                        force=args.force)
        flags = next((f" --key-{k} {shlex.quote(v)}" for k in ("env", "file", "keyring")
                      if (v := getattr(args, f"key_{k}", None))), "")  # the user's own: pasted as printed
        print(f"{args.output}: {h.plain_size / 1e6:.1f} MB in {h.n_chunks} AES-256-GCM chunks "
              f"(format {h.version}); load it with: ondevice run -m {shlex.quote(args.output)}{flags}")
        return 0
    if args.action == "info":
        d = api.info(args.file)
        if args.json:
            print(json.dumps(d))
        else:
            print(f"{d['path']}: ondevice encrypted model, format {d['format_version']}, {d['algorithm']}")
            print(f"  model {d['plaintext_size']} bytes in {d['chunks']} chunks of {d['chunk_size']}; "
                  f"metadata {d['metadata_size']} bytes; container {d['container_size']} bytes")
        return 0
    d = api.verify(args.file, key_source_from(args))
    print(f"{d['path']}: all {d['chunks']} chunks authentic ({d['verify_s']:.2f} s)")
    return 0
