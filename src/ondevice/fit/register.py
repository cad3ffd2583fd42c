"""The end of a fit: the chosen file registered as a variant of its model (its provenance: plan, predictions,
measurements) and the fit logged in the SQLite store for ``ondevice report --fit``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidArgument
from ..store.record import created_now
from .budget import Budget
from .groups import BASE, Layout
from .plan import Candidate


def store_fit(name, chosen: Candidate, src, reference, ref_note, lay: Layout, bud: Budget, picks, front_rows, shipped,
           im_info, im_sha, text_desc, threads, force, transform: dict, extra: dict):
    """Register the chosen file as a variant (provenance: plan, predictions, measurements) and log the fit."""
    import llama_cpp

    from ..device.info import machine_key
    from ..device.kernels import build_id
    from ..eval.api import model_sha256
    from ..models.catalog import register_variant, store_variants
    from ..quant.quantize import verify, weight_types

    if name in store_variants() and not force:
        raise InvalidArgument(f"a variant named {name!r} already exists; pass --name NEW (name=) or --force "
                              f"(force=True)")
    path = Path(chosen.measured["file"])
    overrides = lay.overrides(chosen.plan)
    prov = {
        "made_by": "ondevice fit", "source": reference.name, "source_path": str(reference.path),
        "source_sha256": model_sha256(reference), "reference_note": ref_note, "type": "fit", "base_type": BASE,
        "overrides": [f"{p}={t}" for p, t in overrides], "plan": chosen.plan, "budget": bud.describe(),
        "predicted": chosen.predicted, "measured": {k: v for k, v in chosen.measured.items() if k != "file"},
        "candidates": [{"plan": c.plan, "predicted": c.predicted,
                        "measured": {k: v for k, v in c.measured.items() if k != "file"}} for c in picks],
        "shipped": {"model": src.name, **shipped}, "imatrix": {**im_info, "sha256": im_sha}, "transform": transform,
        "text": text_desc, "threads": threads, "machine": machine_key(), "llama_build": build_id(),
        "llama_cpp_python": llama_cpp.__version__,
        "tensor_types": verify(weight_types(path), BASE, overrides),
        "created": created_now(), **extra,  # the profile, the quality
    }
    ref = register_variant(name, path, prov)
    log_fit(name, model_sha256(ref), chosen, src, bud, picks, front_rows, shipped, threads, extra)
    return ref


def log_fit(name: str, sha: str, chosen: Candidate, src, bud: Budget, picks, front_rows, shipped, threads,
            extra: dict, shipped_chosen: bool = False) -> None:
    """The fit's record in the SQLite store (``report --fit``): the validated candidates, the predicted front and
    the shipped file; ``shipped_chosen``: the shipped file was the answer, so no variant was stored (``name``,
    ``sha``: the shipped model's)."""
    from ..store import Store

    rec = {"model": name, "model_sha256": sha, "family": src.name, "test": "fit", "budget": bud.describe(),
           "plan": chosen.plan, "predicted": chosen.predicted,
           "measured": {k: v for k, v in chosen.measured.items() if k != "file"}, "front": front_rows,
           "candidates": [{"plan": c.plan, "predicted": c.predicted,
                           "measured": {k: v for k, v in c.measured.items() if k != "file"}} for c in picks],
           "shipped": {"model": src.name, **shipped}, "shipped_chosen": shipped_chosen, "threads": threads,
           "created": created_now(), **extra}
    with Store() as db:
        db.add("fit", rec, session=f"fit-{time.strftime('%Y%m%d-%H%M%S')}", config_key=sha[:16], model=name,
               model_sha256=sha, test="fit")


def keep_shipped_knobs(src, runtime: dict, profile: dict | None, say: Callable[[str], None]) -> None:
    """The knobs a fit measured on the file in hand (it stores no variant: that file is the answer), kept for that
    file's loads (``models/runtime_knobs``), with where they were measured as a variant's provenance holds it. Knobs
    measured under a device profile are not kept: they are that device's, and every load here would say so."""
    if profile:
        return
    from ..device.info import machine_key
    from ..device.kernels import build_id
    from ..models.runtime_knobs import keep_knobs

    keep_knobs(src.path, {"made_by": "ondevice fit --knobs", "machine": machine_key(), "llama_build": build_id(),
                          "profile": profile, "measured": {"runtime": runtime}})
    say_knobs(src.name, runtime, profile, say)


def say_knobs(name: str, runtime: dict | None, profile: object, say: Callable[[str], None]) -> None:
    """Say that ``name`` loads with the knobs measured for it (not those measured under a device profile)."""
    if (runtime or {}).get("flags") and not profile:
        say(f"run, chat and serve load {name} with its knobs on this machine ({runtime['flags']}; a flag given "
            f"overrides its knob)")
