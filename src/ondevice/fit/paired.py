"""Tok/s of files benched together in rounds (``ondevice bench --interleave``, every file once a round), with
the machine's drift between rounds taken out: each file's figure (:func:`paired`) and its relative standard
error (:func:`paired_rse`). Used by the fit's speed measurements (``measure.Meter.speeds``)."""

from __future__ import annotations


def _rounds(runs: list[list[float]]) -> tuple[int, list[float], float]:
    """Rounds all files ran (the shortest's), each round's level (geometric mean of its runs), their mean."""
    import math
    import statistics

    n = min((len(r) for r in runs if r), default=0)
    full = [r for r in runs if r]
    levels = [math.exp(statistics.fmean(math.log(r[k]) for r in full)) for k in range(n)]
    mean_level = math.exp(statistics.fmean(math.log(x) for x in levels)) if n else 0.0
    return n, levels, mean_level


def paired(runs: list[list[float]]) -> list[float]:
    """Each file's tok/s from runs measured in rounds (``runs[f][r]``: file f's run in round r, every file
    once per round), with the machine's drift taken out: a round's level (the geometric mean of its runs)
    divides each run, and a file's figure is the median of what is left, times the mean level. Files
    compared this way differ by what they are: a round that ran fast or slow moves every file alike. One
    file: its geometric mean. Rounds past the shortest file's are left out; a file with no runs gets None."""
    import statistics

    n, levels, mean_level = _rounds(runs)
    if n == 0:
        return [None] * len(runs)
    return [mean_level * statistics.median(r[k] / levels[k] for k in range(n)) if r else None for r in runs]


def paired_rse(runs: list[list[float]]) -> list[float | None]:
    """The relative standard error of each :func:`paired` figure: the spread of the file's runs once each
    round's level is divided out, as the standard error of their median (1.2533 s / sqrt(n)) over the
    median. What is left after the levels are out is each run's own noise (and the machine's state
    slowing some kernels more than others): it is what a second measurement of the same files would move
    by. A round's level holds 1/F of each of its F runs' own noise, so the residuals spread less than the
    runs do, by sqrt((F-1)/F): that is put back. None with fewer than 3 rounds, or for a file alone (its
    level is itself)."""
    import math
    import statistics

    n, levels, _ = _rounds(runs)
    files = sum(1 for r in runs if r)
    if n < 3 or files < 2:
        return [None] * len(runs)
    scale = 1.2533 / math.sqrt(n) * math.sqrt(files / (files - 1))
    out: list[float | None] = []
    for r in runs:
        x = [r[k] / levels[k] for k in range(n)] if r else []
        out.append(scale * statistics.stdev(x) / statistics.median(x) if x else None)
    return out
