"""What ``ondevice adapt`` checks before the model loads: settings that cannot train, and the adapter file it
would write (never the base model or the data; an adapter there already only with --force), as merge and
average check theirs (store.check_output)."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import InvalidArgument

PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("auto", "on", "off")
MEMORY = ("auto", "lean", "fast")


def check_settings(cfg) -> None:
    """Settings that cannot train (or cannot be written), refused before the model loads."""
    if cfg.checkpointing not in CHECKPOINTING:
        raise InvalidArgument(f"--checkpointing {cfg.checkpointing!r}: use one of {', '.join(CHECKPOINTING)}")
    if cfg.precision not in PRECISIONS:
        raise InvalidArgument(f"--precision {cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    if cfg.memory not in MEMORY:
        raise InvalidArgument(f"--memory {cfg.memory!r}: use one of {', '.join(MEMORY)}")
    if cfg.memory == "fast" and cfg.budget_bytes is not None:
        raise InvalidArgument("--memory fast with --budget: the budget is planned and kept with lean memory (freed "
                              "memory goes back to the OS at once); drop --memory fast, or drop --budget")
    if cfg.budget_bytes is None and cfg.plan is None and (not cfg.modules or cfg.layers == ()):
        from .model import MODULES
        from .train import _shown

        raise InvalidArgument(f"--modules {','.join(cfg.modules)!r} --layers {_shown('layers', cfg.layers)}: no "
                              f"tensor to train; give at least one of {','.join(MODULES)} (or 'all') and one layer")
    if cfg.epochs is not None and cfg.steps is not None:
        raise InvalidArgument(f"--epochs {cfg.epochs:g} and --steps {cfg.steps} both given: --epochs counts the steps "
                              f"itself (ceil(epochs * training examples / batch)); give one of them")
    if cfg.epochs is not None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise InvalidArgument(f"--epochs {cfg.epochs:g}: must be a number > 0, e.g. --epochs 3")
    if (cfg.steps is not None and cfg.steps < 1) or cfg.batch < 1 or cfg.max_len < 8 or cfg.rank < 1:
        raise InvalidArgument("--steps, --batch and --rank must be >= 1 and --max-len >= 8")
    for flag, v, eg in (("--lr", cfg.lr, "1e-3"), ("--alpha", cfg.alpha, "16")):
        if not (math.isfinite(v) and v > 0):  # AdamW refuses lr <= 0 with a traceback; alpha 0 trains nothing
            raise InvalidArgument(f"{flag} {v:g}: must be a number > 0, e.g. {flag} {eg}")
    if not (math.isfinite(cfg.heldout) and 0 <= cfg.heldout < 1):
        raise InvalidArgument(f"--heldout {cfg.heldout:g}: the share of examples held out must be >= 0 and < 1, "
                              "e.g. --heldout 0.1")
    if cfg.checkpoint_every < 0:
        raise InvalidArgument(f"--checkpoint-every {cfg.checkpoint_every}: must be >= 0 (0: only on Ctrl-C)")
    check_target(cfg)


def check_target(cfg, force: bool = True, given: str | None = None, *, library: bool = False) -> None:
    """The adapter file ``cfg.out``, checked before any work as merge and average check theirs: never the base
    model or the training data, never an existing file that is no LoRA adapter, an existing adapter only with
    ``force`` (the CLI's --force, ``ondevice.adapt``'s force=True; True here: train() itself checks only what
    force does not change). ``given``: the -o text (``library``: the out= value, and words for a Python call)."""
    from ..errors import OndeviceError
    from ..models import resolve
    from .store import check_out_file, check_output

    check_out_file(cfg.out, "adapter's", Path(cfg.data).stem + ".gguf")
    if not cfg.out:
        return
    try:
        base = resolve(cfg.model).path
    except OndeviceError:  # said where the model loads
        base = None
    check_output(Path(cfg.out), "adapter", "ondevice.adapt" if library else "adapt", force,
                 [("the base model", base), ("the training data", cfg.data)], given=given, library=library)


def check_rank(cfg, info) -> None:
    """A hand-chosen ``--rank`` (no --budget, no plan) that cannot help or cannot fit, refused before anything is
    allocated: above the smallest dimension of the adapted matrices a LoRA adds nothing over full rank (SmolLM2's
    q and v: 576), and the LoRA weights, their gradients and AdamW's two moments (16 bytes a parameter, fp32) must
    fit in the memory there is. ``info``: the base's GGUF header (tensor shapes, ggml order: in, out)."""
    if cfg.plan is not None or cfg.budget_bytes is not None:
        return
    n_layer = int(info.metadata.get(f"{info.architecture}.block_count", 0))
    layers = range(n_layer) if cfg.layers is None else cfg.layers
    dims = {m: s[:2] for i in layers for m in cfg.modules if (s := info.tensor_shapes.get(f"blk.{i}.{m}.weight"))}
    if not dims:  # unknown modules or layers: default_plan names them
        return
    small = min(min(s) for s in dims.values())
    if cfg.rank > small:
        which = [m for m, s in dims.items() if min(s) == small]
        raise InvalidArgument(f"--rank {cfg.rank}: above {small}, the smallest dimension of the matrices it adapts "
                              f"({','.join(which)}: {'x'.join(map(str, dims[which[0]][::-1]))}), a LoRA adds "
                              f"nothing over a full-rank change, and costs memory; give --rank {small} or less "
                              f"(4 to 64 is usual)")
    n_tensors = {m: sum(f"blk.{i}.{m}.weight" in info.tensor_shapes for i in layers) for m in dims}
    need = sum(cfg.rank * (int(s[0]) + int(s[1])) * n_tensors[m] for m, s in dims.items()) * 16
    from ..eval.window import available_memory_bytes

    avail = available_memory_bytes()
    if avail is not None and need > avail:
        raise InvalidArgument(f"--rank {cfg.rank}: the LoRA weights, their gradients and the optimizer state alone "
                              f"need {need / 2**30:.1f} GiB, and {avail / 2**30:.1f} GiB of memory is available; "
                              f"give a smaller --rank, fewer --modules or --layers, or --budget mem=SIZE to plan it")
