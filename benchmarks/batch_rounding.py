"""Does llama.cpp compute a token the same alone and as the first row of a batch? (What speculative decoding's
"greedy output unchanged" rests on: a verify step decodes the next token with its drafts after it.)

For prompts of growing length, with flash attention off and on (``-fa auto``, llama.cpp's default, turns it on for
CPUs): the last prompt token decoded alone after the rest of the prompt, against the same token as row 0 of a
2- and a 4-row step (drafts after it), and against the whole prompt prefilled in one go; printed as the largest
absolute logit difference, and each flash-attention logit row against flash attention off, the lone decode.

    python benchmarks/batch_rounding.py [-m MODEL] [--words 100,300,600] [-t 2]

The prompt is the README's first words. A difference of 0 means bit for bit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import ondevice

README = Path(__file__).resolve().parents[1] / "README.md"


def rows(engine, toks: list[int]) -> dict[str, np.ndarray]:
    """Logits of the last prompt token: alone, as row 0 of a 2- and a 4-row step, and in a whole-prompt prefill."""
    n, out = len(toks), {}
    engine.reset()
    engine.prefill(toks[:-1])
    engine.decode(toks[-1])
    out["alone"] = np.array(engine.logits(-1))
    for k in (2, 4):
        engine.reset()
        engine.prefill(toks[:-1])
        engine.decode_batch([(toks[-1], n - 1, 0, True)] + [(toks[0], n + j, 0, True) for j in range(k - 1)])
        out[f"row 0 of {k}"] = np.array(engine.logits(0))
    engine.reset()
    engine.prefill(toks)
    out["whole prefill"] = np.array(engine.logits(-1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--words", default="100,300,600")
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    words = README.read_text().split()
    print("flash_attn  tokens  max |logit difference| against the lone decode; [against flash attention off, alone]")
    for n_words in map(int, a.words.split(",")):
        ref = None
        for fa in (False, True):
            m = ondevice.load(a.model, n_ctx=4096, n_threads=a.threads, flash_attn=fa)
            toks = m.engine.tokenize(" ".join(words[:n_words]), True, True)
            got = rows(m.engine, toks)
            m.close()
            ref = got["alone"] if ref is None else ref
            diffs = ", ".join(f"{k} {np.abs(v - got['alone']).max():.3f}" for k, v in got.items() if k != "alone")
            vs_off = ", ".join(f"{k} {np.abs(v - ref).max():.3f}" for k, v in got.items())
            print(f"{'on' if fa else 'off':>10}  {len(toks):>6}  {diffs}  [{vs_off}]")


if __name__ == "__main__":
    main()
