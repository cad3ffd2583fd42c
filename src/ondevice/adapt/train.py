"""LoRA training on the CPU: frozen GGUF base, loss on the answer tokens, checkpoints, Ctrl-C safe, resume.

Reduced precision follows "Reduced-precision on-device learning": the LoRA weights and the optimizer stay in
fp32 (master weights), the forward/backward run in the compute dtype (bf16 here only where asked).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InvalidArgument, OndeviceError
from ..models.store import cached_sha256, sha256_file
from ..stop_signals import signals_held
from . import adapter_file, data
from .batches import Batches, epochs_of, steps_for
from .checks import CHECKPOINTING, MEMORY, PRECISIONS, check_rank, check_settings, check_target  # noqa: F401

DEFAULT_STEPS = 40


@dataclass
class AdaptConfig:
    """One training run. ``plan`` (``{base tensor name: rank}``) wins over ``modules``/``layers``/``rank``;
    with ``budget_bytes`` set, budget.py chooses the plan from a probe batch."""

    data: str
    out: str | None = None  # None: the adapter store, as ``name`` (store.py)
    name: str | None = None  # None: the data file's stem
    model: str | None = None
    steps: int | None = None  # None: ``epochs`` passes over the training examples, else DEFAULT_STEPS
    epochs: float | None = None  # steps = ceil(epochs * training examples / batch); not with ``steps``
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    modules: tuple[str, ...] = ("attn_q", "attn_v")
    layers: tuple[int, ...] | None = None  # None: every layer
    plan: dict[str, int] | None = None
    batch: int = 4
    max_len: int = 128
    precision: str = "fp32"
    threads: int = 2
    seed: int = 0
    budget_bytes: int | None = None
    checkpointing: str = "auto"  # gradient checkpointing: auto (the planner's choice under a budget), on, off
    memory: str = "auto"  # malloc: lean (freed memory back to the OS at once), fast; auto: lean under a budget
    checkpoint_every: int = 10
    heldout: float = 0.1  # share of the examples kept out of training to measure held-out loss
    resume: bool = False
    progress: bool = True
    plan_info: dict = field(default_factory=dict)  # filled by the budget planner (what it measured and chose)

    def target(self) -> Path:
        """The adapter file to write: ``out``, else ``name`` (or the data's stem) in the adapter store."""
        from .store import path_for, target

        if self.out and self.name is not None and Path(self.out) == path_for(self.name):  # a second train(cfg)
            return Path(self.out)
        return target(self.out, self.name, Path(self.data).stem)

    @property
    def ckpt_path(self) -> Path:
        return Path(str(self.out) + ".ckpt.pt")


# what a checkpoint's run was made with and a resumed one must keep (the flag each comes from): they shape the
# adapter's tensors, the optimizer's state or the held-out split. --steps (or --epochs), --checkpoint-every and
# -t may change.
FIXED_ON_RESUME = {"lr": "--lr", "batch": "--batch", "max_len": "--max-len", "rank": "--rank", "alpha": "--alpha",
                   "modules": "--modules", "layers": "--layers", "budget_bytes": "--budget",
                   "checkpointing": "--checkpointing", "precision": "--precision", "seed": "--seed",
                   "heldout": "--heldout"}


def _shown(key: str, v) -> str:
    """A setting as its flag takes it."""
    if v is None:
        return "(not given)"
    if key == "budget_bytes":
        return f"mem={v / 2**20:g}M"
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _differences(cfg: AdaptConfig, made: dict) -> list[tuple[str, str, str]]:
    """(flag, this run's value, the checkpoint's) for each fixed setting where they differ."""
    return [(FIXED_ON_RESUME[k], _shown(k, getattr(cfg, k)), _shown(k, v)) for k, v in made.items()
            if k in FIXED_ON_RESUME and _shown(k, getattr(cfg, k)) != _shown(k, v)]


def refuse_forgotten_resume(cfg: AdaptConfig, base_sha256: str, data_sha256: str) -> None:
    """A run started without --resume over the checkpoint of this same run (base, data and settings), whose
    first save would replace it: refused, since the steps it holds would be lost; a checkpoint of another run
    (other settings or data: the start-over the resume refusals advise) is replaced, and said so."""
    import warnings

    import torch

    if cfg.resume or not cfg.ckpt_path.is_file():
        return
    try:
        state = torch.load(cfg.ckpt_path, weights_only=True)
        step, made = int(state["step"]), state.get("settings", {})
        same = state["base_sha256"] == base_sha256 and state["data_sha256"] == data_sha256
    except Exception:  # noqa: BLE001 — an unreadable checkpoint holds nothing to resume
        return
    if same and not _differences(cfg, made):
        from ..models.store import home

        stored = cfg.ckpt_path.parent == home() / "adapters" and cfg.ckpt_path.name.endswith(".gguf.ckpt.pt")
        rm = f" (`ondevice adapt rm {cfg.ckpt_path.name.removesuffix('.gguf.ckpt.pt')}`)" if stored else ""
        raise InvalidArgument(f"{cfg.ckpt_path} holds this same run, interrupted after step {step}: add --resume to "
                              f"continue it (in Python: resume=True), or delete that file{rm} to start over")
    warnings.warn(f"starting over: {cfg.ckpt_path} (another run's, interrupted after step {step}) is replaced by "
                  f"this run's checkpoints", stacklevel=2)


def load_checkpoint(cfg: AdaptConfig) -> dict:
    """The checkpoint ``cfg`` resumes, refused (naming each flag) where ``cfg`` asks for another run than it."""
    import torch

    if not cfg.ckpt_path.is_file():
        raise InvalidArgument(f"--resume: no checkpoint at {cfg.ckpt_path}; start without --resume")
    try:
        state = torch.load(cfg.ckpt_path, weights_only=True)  # plain data only: no pickled code
    except Exception as e:  # noqa: BLE001 — truncated by a crash mid-write cannot happen (temp + rename); other files can
        raise InvalidArgument(f"--resume: cannot read the checkpoint {cfg.ckpt_path} ({e}); start over "
                              f"without --resume") from None
    made = state.get("settings", {})  # a checkpoint without them (an older ondevice) is taken as it is
    differ = _differences(cfg, made)
    if differ:
        given = " ".join(f"{flag} {old}" for flag, _, old in differ if old != "(not given)")
        fix = " and ".join(f"{how} {flags}" for how, flags in (
            ("with", given), ("without", " ".join(flag for flag, _, old in differ if old == "(not given)"))) if flags)
        raise InvalidArgument("--resume: " + ", ".join(f"{flag} {new} differs from the checkpoint's {old}"
                                                        for flag, new, old in differ)
                              + f"; resume {fix} or start over without --resume (only --steps or --epochs, "
                                f"--checkpoint-every and -t may change on resume)")
    if cfg.steps is not None:  # --epochs: checked once the examples are counted (total_steps)
        check_resumed_steps(cfg.steps, None, state["step"])
    return state


def check_resumed_steps(steps: int, epochs: float | None, done: int) -> None:
    if steps < done:
        given = f"--epochs {epochs:g} makes {steps} steps, which is" if epochs is not None else f"--steps {steps} is"
        raise InvalidArgument(f"--resume: {given} fewer than the {done} steps the checkpoint has done; give "
                              f"--steps {done} or more")


def total_steps(cfg: AdaptConfig, n_train: int) -> int:
    """The run's steps: ``steps``, else ``epochs`` passes over the ``n_train`` examples, else DEFAULT_STEPS."""
    if cfg.steps is not None:
        return cfg.steps
    return DEFAULT_STEPS if cfg.epochs is None else steps_for(cfg.epochs, n_train, cfg.batch)


def peak_rss() -> int:
    from ..engine.model import peak_rss_bytes

    return peak_rss_bytes()


def lean_malloc() -> None:
    """glibc malloc settings that return freed activation memory to the OS: big blocks mmapped (no dynamic
    threshold), one arena (OpenMP threads otherwise each grow their own), trimming past 1 MiB. Measured here:
    steady RSS over training steps 599 -> 442 MiB, peak 668 -> 580 MiB (top 10 layers, q+v, 4x64 tokens).
    The price: every tensor over 64 KiB is a fresh mmap, page-faulted in and unmapped each step: steps took
    2.1x (fp32) and 3.1x (bf16) the time of glibc as it comes (top 6 layers, q+v, 4x64 tokens, quiet AMX Xeon).
    So only under a memory budget (``--memory auto``) or when asked (``--memory lean``)."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)  # and what is free already (a long-lived process: earlier work's heap) goes back now
    except (OSError, AttributeError):  # not glibc (musl): its defaults stand
        pass


def prepare(cfg: AdaptConfig):
    """Tokenize with the base's llama.cpp vocabulary and template, then free llama.cpp before torch trains."""
    import ondevice

    check_settings(cfg)
    from ..models import resolve
    from .model import trainable

    info = trainable(resolve(cfg.model).path)  # the architecture first: a missing template is the lesser reason
    check_rank(cfg, info)  # before the data is read and the model loads
    convs = data.read_jsonl(cfg.data)
    m = ondevice.load(cfg.model, n_ctx=max(64, cfg.max_len + 16), n_threads=1, warmup=False)
    try:
        examples = data.tokenize(m, convs, cfg.max_len)
        base = {"path": str(m.path), "name": m.name, "sha256": cached_sha256(m.path)}
    finally:
        m.close()
    rng = random.Random(cfg.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_held = int(len(order) * cfg.heldout) if len(order) >= 10 else 0
    if cfg.heldout not in (0, AdaptConfig.heldout) and not n_held:  # a share asked for, held out of nothing: said
        # (the default share is not: small data sets are common, and the summary then shows no held-out loss)
        import warnings

        warnings.warn(f"--heldout {cfg.heldout:g} holds out no example of {len(order)} (held-out loss needs 10 "
                      f"examples or more, and at least one held out): this run reports no held-out loss",
                      stacklevel=2)
    held = [examples[i] for i in order[:n_held]]
    train = [examples[i] for i in order[n_held:]]
    return base, train, held


def batch_tensors(examples):
    """Right-padded (B, T) tokens, the (B, T) mask of positions whose next token is an answer token, and those
    next tokens (n,): position t predicts token t+1."""
    import torch

    T = max(len(e.tokens) for e in examples)
    toks = torch.zeros(len(examples), T, dtype=torch.long)
    want = torch.zeros(len(examples), T, dtype=torch.bool)
    for i, e in enumerate(examples):
        toks[i, :len(e.tokens)] = torch.tensor(e.tokens)
        want[i, e.n_prompt - 1:len(e.tokens) - 1] = True
    targets = torch.roll(toks, -1, dims=1)[want]
    return toks, want, targets


def loss_on(model, examples, dtype=None):
    import torch.nn.functional as F

    toks, want, targets = batch_tensors(examples)
    return F.cross_entropy(model(toks, want), targets)


def mean_loss(model, examples, batch: int = 8) -> float | None:
    """Token-weighted mean answer loss over ``examples`` (no gradients)."""
    import torch

    if not examples:
        return None
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            part = examples[i:i + batch]
            k = sum(len(e.tokens) - e.n_prompt for e in part)
            total += float(loss_on(model, part)) * k
            n += k
    return total / n


def default_plan(cfg: AdaptConfig, n_layer: int) -> dict[str, int]:
    from .model import MODULES

    bad = [m for m in cfg.modules if m not in MODULES]
    if bad:
        raise InvalidArgument(f"--modules {','.join(bad)}: not a LoRA target; use some of {','.join(MODULES)}")
    layers = range(n_layer) if cfg.layers is None else cfg.layers
    if any(not 0 <= i < n_layer for i in layers):
        raise InvalidArgument(f"--layers: this model has layers 0..{n_layer - 1}")
    return {f"blk.{i}.{m}.weight": cfg.rank for i in layers for m in cfg.modules}


def build(cfg: AdaptConfig, base: dict, train_examples):
    """The torch model with LoRA on the planned tensors (planning under the budget when one is given)."""
    import torch

    from .model import LlamaLoRA

    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = LlamaLoRA(base["path"], dtype=dtype)
    if cfg.plan is None:
        if cfg.budget_bytes is not None:
            from .budget import plan_under_budget

            say = (lambda msg: print(f"plan under --budget: {msg}", file=sys.stderr, flush=True)) if cfg.progress \
                else (lambda _msg: None)  # the planning measures for minutes on 2 cores: say what it does
            cfg.plan, cfg.plan_info = plan_under_budget(model, train_examples, cfg, say)
        else:
            cfg.plan = default_plan(cfg, model.cfg.n_layer)
    lins = model.linears()
    g = torch.Generator().manual_seed(cfg.seed)
    for name, r in sorted(cfg.plan.items()):
        if name not in lins:
            raise InvalidArgument(f"the plan names {name}, which this model does not have")
        lins[name].add_lora(r, cfg.alpha, g)
    model.grad_from = min(int(n.split(".")[1]) for n in cfg.plan)  # nothing trainable below: no autograd there
    # without a budget nothing asks for the memory: only "on" recomputes; with one, the planner decided
    model.checkpoint = bool(cfg.plan_info.get("checkpoint", cfg.checkpointing == "on"))
    return model


def train(cfg: AdaptConfig) -> dict:
    """Train, export the adapter GGUF and return the run's figures."""
    import torch

    torch.set_num_threads(max(1, cfg.threads))
    named_after_data = cfg.out is None and cfg.name is None
    cfg.out = str(cfg.target())
    if named_after_data and not cfg.resume:
        from .store import refuse_replacing_other_data

        refuse_replacing_other_data(Path(cfg.out), cfg.data)
    check_settings(cfg)
    memory = "lean" if cfg.memory == "lean" or (cfg.memory == "auto" and cfg.budget_bytes is not None) else "fast"
    if memory == "lean":
        lean_malloc()
    t_start = time.perf_counter()
    state = load_checkpoint(cfg) if cfg.resume else None
    fixed = {k: getattr(cfg, k) for k in FIXED_ON_RESUME}  # what a resume must keep (load_checkpoint checks)
    base, train_ex, held = prepare(cfg)
    data_sha = sha256_file(cfg.data)
    refuse_forgotten_resume(cfg, base["sha256"], data_sha)
    if state is not None:
        if state["base_sha256"] != base["sha256"]:
            raise InvalidArgument(f"--resume: {cfg.ckpt_path} was made from another base model than {base['name']}; "
                                  f"resume with the -m it was made with or start over without --resume")
        if state["data_sha256"] != data_sha:
            raise InvalidArgument(f"--resume: {cfg.ckpt_path} was made from other data than {cfg.data} (it changed "
                                  f"since); resume on the data it was made from or start over without --resume")
        cfg.plan, cfg.plan_info = state["plan"], state["plan_info"]
    total = total_steps(cfg, len(train_ex))
    if state is not None:
        check_resumed_steps(total, cfg.epochs, state["step"])
    try:  # the budget planner measures for minutes on a busy CPU: Ctrl-C there is said, not a bare exit
        model = build(cfg, base, train_ex)
        held_before = mean_loss(model, held) if state is None else state["held_before"]
    except KeyboardInterrupt as e:
        if state is not None:
            left = f"; {cfg.ckpt_path} is as it was: run the same command again to continue from step {state['step']}"
        else:
            planning = " (planning under --budget)" if cfg.budget_bytes and cfg.plan is None else ""
            left = f"{planning}; nothing was trained, so there is nothing to resume: run the same command again"
        _interrupted(cfg, e, "interrupted before the first step" + left)
        raise
    params = [p for lin in model.linears().values() if lin.rank for p in (lin.lora_a, lin.lora_b)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, min(5, total // 10))  # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))
    step, history = 0, []
    batches = Batches(len(train_ex), cfg.batch, cfg.seed)
    if state is not None:
        model.load_state_dict(state["lora"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, history = state["step"], state["history"]
        # an older ondevice's checkpoint kept only the rng (batches drawn with replacement): a fresh order from it
        batches.set_state(state["batches"] if "batches" in state else {"rng": state["rng"], "order": [], "pos": 0})

    saved = [state["step"] if state is not None else None]  # the step the checkpoint on disk holds

    def save_ckpt(dest: Path = cfg.ckpt_path) -> None:
        """The run so far to ``dest`` (temp file, then rename); a failed write (a full disk: torch says only
        "unexpected pos ...") is one line, its temp file gone, the checkpoint there before kept."""
        tmp = dest.with_suffix(".part")
        try:
            torch.save({"step": step, "history": history, "batches": batches.state(), "plan": cfg.plan,
                        "plan_info": cfg.plan_info, "held_before": held_before, "base_sha256": base["sha256"],
                        "data_sha256": data_sha, "settings": fixed, "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        # what `adapt list` shows of an interrupted run, and the command that resumes it
                        "run": {"data": str(Path(cfg.data).resolve()), "model": cfg.model, "base": base["name"],
                                "steps": total, "steps_given": cfg.steps, "epochs": cfg.epochs,
                                "n_train": len(train_ex)},
                        "lora": {k: v for k, v in model.state_dict().items() if "lora_" in k}}, tmp)
            os.replace(tmp, dest)
        except Exception as e:  # noqa: BLE001 — torch's full disk is a RuntimeError
            tmp.unlink(missing_ok=True)
            need = sum(p.numel() * 12 for p in params)  # fp32 LoRA weights and AdamW's two moments
            raise adapter_file.write_failed(dest, e, need, "the checkpoint", kept=False) from None
        if dest == cfg.ckpt_path:
            saved[0] = step

    def checkpoint() -> None:
        """save_ckpt during training: a failure stops the run, saying what is kept and how to go on."""
        try:
            save_ckpt()
        except OndeviceError as e:
            kept = (f"{cfg.ckpt_path} still holds step {saved[0]}" if saved[0] is not None and cfg.ckpt_path.is_file()
                    else "no earlier checkpoint is there")
            raise OndeviceError(f"{e}; training stopped at step {step}/{total}; {kept}: free some space (or give -o "
                                f"on another disk) and run the same command"
                                f"{' plus --resume' if saved[0] is not None else ''}") from None

    t0 = time.perf_counter()
    step0, measuring = step, ""
    unfinished = None  # the order as the step under way found it: an interrupt draws its batch again on resume
    try:
        while step < total:
            unfinished = batches.state()
            batch = [train_ex[i] for i in batches.next()]
            loss = loss_on(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with signals_held():  # the update and its count together: a resume neither skips nor repeats it
                opt.step()
                sched.step()
                step += 1
                history.append(round(loss.item(), 5))
                unfinished = None
            if cfg.progress:
                _progress(step, total, history[-1], (time.perf_counter() - t0) / (step - step0))
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                checkpoint()
        step_s = (time.perf_counter() - t0) / max(1, step - step0)
        measuring = " (measuring the held-out loss)"  # a minute on many examples: Ctrl-C there keeps the steps too
        held_after = mean_loss(model, held)
    except KeyboardInterrupt as e:
        if unfinished is not None:
            batches.set_state(unfinished)
        checkpoint()
        _interrupted(cfg, e, f"interrupted at step {step}/{total}{measuring}; checkpoint saved to "
                             f"{cfg.ckpt_path}; continue with the same command plus --resume (in Python: resume=True)")
        raise
    if cfg.progress and sys.stderr.isatty():
        print(file=sys.stderr)  # ends the bar's line
    figures = {"steps": step, "first_loss": history[0] if history else None, "last_loss": history[-1] if history
               else None, "heldout_loss_before": held_before, "heldout_loss_after": held_after,
               "seconds_per_step": round(step_s, 3), "peak_rss_bytes": peak_rss(),
               "epochs": round(epochs_of(step, len(train_ex), cfg.batch), 2),
               "n_train": len(train_ex), "n_heldout": len(held), "trainable_params": sum(p.numel() for p in params),
               "checkpointing": model.checkpoint, "memory": memory,
               "wall_s": round(time.perf_counter() - t_start, 1)}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("plan", "plan_info", "progress", "resume")}
    settings["steps"] = total
    try:
        export(model, cfg, base, data_sha, settings, figures)
    except (OndeviceError, KeyboardInterrupt) as e:  # the steps are done: kept as a checkpoint, the file retried
        keep = _keep_finished(save_ckpt, cfg, step, saved[0] == step)
        if isinstance(e, KeyboardInterrupt):
            _interrupted(cfg, e, "interrupted while writing the adapter" + keep)
            raise
        raise OndeviceError(f"{e}{keep}") from None
    cfg.ckpt_path.unlink(missing_ok=True)
    return {"adapter": str(cfg.out), "plan": cfg.plan, "plan_info": cfg.plan_info, "history": history,
            "base": base, **figures}


def _keep_finished(save_ckpt, cfg: AdaptConfig, step: int, done: bool) -> str:
    """The finished steps, kept as a checkpoint after the adapter could not be written: beside the adapter (what
    --resume reads), else (that disk is full too) in the temp folder to be moved there; what to do, said."""
    import tempfile

    how = "run the same command plus --resume to write the adapter (in Python: resume=True)"
    try:
        if not done:
            save_ckpt()
        return f"; the finished training ({step} steps) is kept in {cfg.ckpt_path}: free some space and {how}"
    except OndeviceError as e:
        alt = Path(tempfile.gettempdir()) / cfg.ckpt_path.name
        if alt.resolve() == cfg.ckpt_path.resolve():
            raise
        try:
            save_ckpt(alt)
        except OndeviceError as e2:
            raise OndeviceError(f"the finished training could not be kept either: {e}; {e2}") from None
        return (f"; the finished training ({step} steps) is kept in {alt} (not beside it: {e}): once there is room, "
                f"move it to {cfg.ckpt_path} and {how}")


def _interrupted(cfg: AdaptConfig, e: KeyboardInterrupt, note: str) -> None:
    """Say what Ctrl-C left: on stderr under a progress line, else on the exception (a library call prints
    nothing it was not asked to)."""
    if cfg.progress:
        print(f"{chr(10) if sys.stderr.isatty() else ''}{note}", file=sys.stderr)  # under the bar's line
        e.said = True  # the CLI's main() adds no line of its own
    else:
        e.add_note(note)


def export(model, cfg: AdaptConfig, base: dict, data_sha: str, settings: dict, figures: dict) -> Path:
    from ..store.record import created_now

    tensors = {lin.name: (lin.lora_a.detach().float().numpy(), lin.lora_b.detach().float().numpy())
               for lin in model.linears().values() if lin.rank}
    prov = {"base_sha256": base["sha256"], "base_name": base["name"], "base_path": base["path"],
            "data_sha256": data_sha,
            "created": created_now(), "settings": settings, "figures": figures, "plan": cfg.plan,
            "plan_info": {k: v for k, v in cfg.plan_info.items() if k != "candidates"}}
    return adapter_file.write(cfg.out, model.cfg.arch, cfg.alpha, tensors, prov)


def _progress(step: int, total: int, loss: float, s_per_step: float) -> None:
    """The progress bar, redrawn in place on a terminal; elsewhere (a log, CI) a plain line for the first step,
    every tenth of the run and the last, as bench's progress writes lines when stderr is not a terminal."""
    tty = sys.stderr.isatty()
    if not tty and step not in (1, total) and step % max(1, total // 10):
        return
    width = 24
    done = int(width * step / total)
    eta = s_per_step * (total - step)
    print(f"{chr(13) if tty else ''}[{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {loss:.4f} "
          f"{s_per_step:.2f} s/step ETA {eta:.0f} s  peak RSS {peak_rss() / 2**20:.0f} MiB", end="" if tty else "\n",
          file=sys.stderr, flush=True)

