"""``ondevice adapt``: LoRA fine-tuning on the CPU under a memory budget, exported as a llama.cpp adapter GGUF.

The torch side (model.py, train.py, budget.py, check.py) needs the ``adapt`` extra
(``pip install 'ondevice[adapt]'``); data.py, adapter_file.py, store.py (adapters by name) and merge.py
(an adapter folded into its base) do not, so the engine can find, check and load adapters without torch.
"""

from __future__ import annotations


def require_torch() -> None:
    """Import torch or say which extra to install."""
    try:
        import torch  # noqa: F401
    except ImportError:
        from ..errors import OndeviceError

        raise OndeviceError("ondevice adapt needs torch: pip install 'ondevice[adapt]' (a CPU build of torch)") \
            from None


def adapt(data: str, *, force: bool = False, **kw) -> dict:
    """Train a LoRA adapter on ``data`` (JSONL) and export it (to ``out``, else into the adapter store as ``name``,
    by default the data file's name); keyword args are :class:`AdaptConfig` fields. An adapter there already is
    replaced only with ``force`` (or continued with ``resume``); the base model, the data or a file that is no
    adapter never (the CLI's one check of ``-o``, before any work). Returns the run's figures (loss, held-out loss
    before/after, s/step, peak RSS, the plan)."""
    require_torch()
    from dataclasses import replace

    from .. import fields
    from .train import AdaptConfig, check_target, train

    if err := fields.unknown("ondevice.adapt()", kw, {*AdaptConfig.__dataclass_fields__, "force"}):
        raise err
    cfg = AdaptConfig(data=data, **kw)
    out = cfg.target()
    if cfg.out is None and cfg.name is None and not cfg.resume:  # as the CLI: another data's adapter first
        from .store import refuse_replacing_other_data

        refuse_replacing_other_data(out, data, " with force=True")
    check_target(replace(cfg, out=str(out)), force or cfg.resume, None if cfg.out is None else str(cfg.out),
                 library=True)
    return train(cfg)


from ..callable_module import make_callable as _make_callable

_make_callable(__name__, "ondevice.adapt:adapt")  # ondevice.adapt(...) after the import, too
