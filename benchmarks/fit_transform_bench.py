"""Does the equivalent transform (``ondevice.fit.transform``: AWQ/SmoothQuant-style per-channel scales folded
into the norms) lower the KLD of quantized SmolLM2, with and without the importance matrix?

    python benchmarks/fit_transform_bench.py [--model smollm2-135m-instruct] [--types Q4_0,Q4_1,Q4_K]
                                             [--alphas 0.25,0.5]

For each type and imatrix off/on, the plan "every group that takes the type at that type, the rest Q8_0"
(the fit's lowest plan for that type) is quantized from the family's F16 (the shipped file dequantized) and
from the transformed F16 at each alpha, and scored by KLD against the UNtransformed F16 on the fit's texts —
exactly what ``ondevice fit --transform auto`` does (``transform.choose``: alpha picked on the calibration
text, kept when the held-out KLD drops by > 2 standard errors or > 5%). Prints held-out KLD without / with per
alpha, the chosen alpha and the auto decision. KLD does not depend on the load; the load average is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="catalog name (default: the embedded SmolLM2)")
    ap.add_argument("--types", default="Q4_0,Q4_1,Q4_K")
    ap.add_argument("--alphas", default=None, help="alpha grid (default: the fit's, transform.ALPHAS)")
    ap.add_argument("--calib-ctx", type=int, default=128)
    ap.add_argument("--calib-chunks", type=int, default=4)
    ap.add_argument("--eval-ctx", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=8)
    args = ap.parse_args()

    from ondevice.engine.resources import physical_cores
    from ondevice.eval.api import model_sha256
    from ondevice.fit import transform
    from ondevice.fit.inputs import reference_for, texts
    from ondevice.fit.groups import BASE, layout
    from ondevice.fit.imatrix import collect
    from ondevice.fit.measure import Cache, Meter, fit_dir, quality_section
    from ondevice.models.catalog import resolve

    t0 = time.time()
    src = resolve(args.model)
    ref, note = reference_for(src, None, print)
    calib, heldout, _ = texts(None)
    ref_sha = model_sha256(ref)
    work = fit_dir() / "transform-bench"
    work.mkdir(exist_ok=True)
    q = fit_dir() / "kld.json"

    def qual(text, ctx, chunks):
        return (Cache(q, quality_section(ref_sha, hashlib.sha256(text.read_bytes()).hexdigest(), ctx, chunks)),
                text, ctx, chunks)

    calib_q = qual(calib, args.calib_ctx, args.calib_chunks)
    held_q = qual(heldout, args.eval_ctx, args.eval_chunks)
    im = work / "imatrix.npz"
    collect(ref.path, calib, im, n_ctx=args.calib_ctx, n_chunks=args.calib_chunks)
    im_sha = hashlib.sha256(im.read_bytes()).hexdigest()
    lay = layout(ref.path)
    alphas = tuple(float(a) for a in args.alphas.split(",")) if args.alphas else None
    print(f"model {src.name} ({src.info.quant_summary}); reference {note}")
    print(f"KLD against the untransformed F16: calibration {args.calib_chunks}x{args.calib_ctx} tokens (picks alpha), "
          f"held-out {args.eval_chunks}x{args.eval_ctx} tokens (decides); load {os.getloadavg()[0]:.2f}")
    rows = []
    for t in (x.strip().upper() for x in args.types.split(",") if x.strip()):
        opts = lay.options((BASE, t))
        plan = {g.name: t for g in lay.groups if t in opts[g.name]}
        for use_im in (False, True):
            meter = Meter(ref.path, lay, ref.path, 1, Cache(fit_dir() / "speed.json", "unused"), work,
                          lambda m: None, jobs=max(1, physical_cores()), seen=set())
            print(f"\n{t} (groups at {t}: {', '.join(plan) or 'none'}), imatrix {'on' if use_im else 'off'}:")
            c = transform.choose("auto", meter, ref, plan, im, calib_q, held_q, im if use_im else None,
                                 im_sha if use_im else None, work, print, alphas=alphas)
            for f in c.files:
                f.unlink(missing_ok=True)
            rows.append((t, "on" if use_im else "off", c.info))
    print(f"\nsummary (held-out KLD vs the F16; alpha chosen on the calibration text; load "
          f"{os.getloadavg()[0]:.2f}; {time.time() - t0:.0f} s):")
    grid = list(rows[0][2]["grid"])
    print(f"  {'type':5s} {'imatrix':7s} {'without':>8s} " + " ".join(f"{'a=' + a:>8s}" for a in grid)
          + f" {'chosen':>6s} {'with':>8s} {'ratio':>6s}  auto")
    for t, i, info in rows:
        print(f"  {t:5s} {i:7s} {info['kld_without']:8.4f} " + " ".join(f"{info['grid'][a]['held']:8.4f}" for a in grid)
              + f" {info['alpha']:6g} {info['kld_with']:8.4f} {info['kld_with'] / info['kld_without']:6.2f}x  "
              + ("used" if info["used"] else "off"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
