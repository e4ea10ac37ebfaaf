"""``phoenix report``: one HTML page with a run's curves, per-layer heatmaps and spikes.

    phoenix report RUN [RUN2 ...] --out DIR

``RUN`` is a run folder (the recipe's ``output_dir``): its TensorBoard event files
(``RUN/tensorboard/<name>/``), ``spikes.jsonl`` and ``config.yaml`` are read; several
runs share every plot's axes. Writes ``DIR/index.html``, its PNG figures and
``DIR/report.json`` (the data of every figure): see :mod:`phoenix.monitor.report`.
A missing run, a run without event files, an ``--out`` that cannot be written or a
missing matplotlib is one line and exit status 2, before anything is read or drawn.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

from phoenix.runtime.command import HelpFormatter


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="phoenix report",
        description="Write a run report (index.html, PNG figures, report.json) from run "
                    "folders' TensorBoard event files, spikes.jsonl and config.yaml.",
        epilog="example:\n  phoenix report runs/quickstart --out runs/quickstart/report\n"
               "  phoenix report runs/quickstart_moe runs/quickstart --out runs/moe-vs-dense")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folder(s) (a recipe's output_dir); several share the axes")
    p.add_argument("--out", required=True, metavar="DIR", help="the report's folder")
    return p


def check_out(out: Path) -> Optional[str]:
    """Why ``out`` cannot hold the report (None: it can); creates it when missing."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # the one sure test of writability
            pass
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror or e})"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from phoenix.monitor.report_data import event_dir

    def fail(message: str) -> int:
        print(f"phoenix report: error: {message}", file=sys.stderr)
        return 2

    try:
        from phoenix.monitor.report_plots import pyplot

        pyplot()
    except ImportError:
        return fail("matplotlib is not installed (pip install matplotlib)")
    for run in args.runs:
        try:
            event_dir(Path(run))
        except ValueError as e:
            return fail(str(e))
    out = Path(args.out)
    problem = check_out(out)
    if problem:
        return fail(problem)

    from phoenix.monitor.report import build_report

    report = build_report(args.runs, out)
    pngs = sum(1 for p in report["plots"])
    spikes = sum(len(r["spikes"]) for r in report["runs"])
    print(f"wrote {out / 'index.html'} ({pngs} figures, {spikes} spike{'' if spikes == 1 else 's'}) and "
          f"{out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
