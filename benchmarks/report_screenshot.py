"""Look at the HTML report as a user would: a small real bench session, its report, a headless Chromium screenshot.

    python benchmarks/report_screenshot.py [--out report.png] [--width 1400] [--records recs.json]

Runs ``ondevice bench`` on the default model (pp32,pp128,tg16,chat16x1 at 1 and 2 threads, 2 repetitions;
about a minute on 2 idle cores) into a temporary store, writes the report and screenshots it with headless
Chromium (``apt-get install chromium``). ``--records`` reuses records saved by an earlier run (``--save``).
Prints the paths of the HTML page and the PNG; open the PNG and read it: labels, legends, summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 2600) -> Path:
    """Render ``html`` in headless Chromium and save a ``width`` x ``height`` PNG."""
    exe = find_chromium()
    if exe is None:
        raise SystemExit("no Chromium here: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not png.is_file():
        raise SystemExit(f"Chromium wrote no screenshot; ran: {' '.join(cmd)}")
    return png


def real_records(home: Path, tests: str, threads: list[int], reps: int) -> list[dict]:
    import ondevice

    os.environ["ONDEVICE_HOME"] = str(home)
    return [r.to_dict() for r in ondevice.bench(None, tests, threads=threads, repetitions=reps, progress=True,
                                                store=home / "r.sqlite")]  # saved with --save as JSON


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="report.png", help="where to write the screenshot")
    ap.add_argument("--html", default=None, help="where to write the HTML (default: beside the PNG)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=2600)
    ap.add_argument("--tests", default="pp32,pp128,tg16,chat16x1", help="the bench's tests")
    ap.add_argument("-t", "--threads", default="1,2", help="thread counts to sweep")
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--records", help="a JSON list of bench records to use instead of running the bench")
    ap.add_argument("--save", help="save the records the bench made to this JSON file")
    args = ap.parse_args()

    from ondevice.report.html import build_html

    if args.records:
        recs = json.loads(Path(args.records).read_text())
    else:
        with tempfile.TemporaryDirectory() as home:
            recs = real_records(Path(home), args.tests, [int(t) for t in args.threads.split(",")],
                                args.repetitions)
        if args.save:
            Path(args.save).write_text(json.dumps(recs, default=str))
    png = Path(args.out)
    html = Path(args.html) if args.html else png.with_suffix(".html")
    html.write_text(build_html(recs, sessions=sorted({r.get("session", "?") for r in recs})), encoding="utf-8")
    screenshot(html, png, args.width, args.height)
    print(f"html: {html}\npng: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
