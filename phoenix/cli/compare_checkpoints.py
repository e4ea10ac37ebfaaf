"""``phoenix compare-checkpoints A B [C ...] --out DIR``: how far each part of the model
(and Adam's moments) moved between consecutive checkpoints.

Each argument is a ``step_*`` folder, a run folder (its latest checkpoint), or a Hugging
Face model folder (imported into a temporary folder with ``hf-to-phoenix`` first). The
checkpoints may come from any TP/PP/DP layout: the comparison reads every tensor at its
global shape (:mod:`phoenix.eval.compare`), in this one process, no launcher needed.

Per consecutive pair (A -> B, B -> C, ...), per state (``weight``; ``exp_avg`` and
``exp_avg_sq`` when both checkpoints hold an optimizer state) and per part
(``layer_03/attention/qkv``, ``layer_03/mlp/fc1``, ``layer_03/norms``, ``embedding``,
``output_layer``, ... and ``global``): ``||A||``, ``||B||``, ``||B - A||``,
``||B - A|| / ||A||`` and ``cosine(A, B)``. Outputs in DIR:

* ``compare.csv``: every row (columns ``pair,state,key,norm_a,norm_b,delta,rel_delta,cosine``);
* ``heatmap.png``: ``||B - A|| / ||A||`` of the weights, layer x part, one panel per pair;
* ``hist.png`` (with ``--hist NAME ...``): the values of each named part in every
  checkpoint, side by side (a row per name, a column per checkpoint).

The PNGs need matplotlib (imported only here); without it a one-line note says so and
only the CSV is written. Exit status 0, or 2 (one line) for a missing checkpoint, fewer
than two, different architectures or an unknown ``--hist`` name, before any work.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

PROG = "phoenix compare-checkpoints"


def _resolve(arg: str, scratch: Path, i: int) -> tuple[Path, str]:
    """(the ``step_*`` folder, a table label) of one argument; HF folders are imported."""
    from phoenix.checkpoint.store import CheckpointError, resolve_checkpoint
    from phoenix.convert.hf_import import hf_to_phoenix

    path = Path(arg)
    try:
        step = resolve_checkpoint(path)
        return step, f"{step.parent.parent.name}@{step.name.removeprefix('step_').lstrip('0') or '0'}"
    except CheckpointError:
        if not (path / "config.json").is_file():
            raise
    out = hf_to_phoenix(path, scratch / f"hf_{i}", progress=False)
    return resolve_checkpoint(out), path.name


def _labels(labels: list[str]) -> list[str]:
    """Unique labels: a repeated one gets its position appended."""
    return [f"{x}#{i}" if labels.count(x) > 1 else x for i, x in enumerate(labels)]


def format_table(rows: list[dict]) -> str:
    width = max([len("key"), *(len(r["key"]) for r in rows)])
    head = (f"{'state':<10} {'key':<{width}} {'||A||':>11} {'||B||':>11} {'||B-A||':>11} "
            f"{'rel':>10} {'cos':>9}")
    lines, pair = [], None
    for r in rows:
        if r["pair"] != pair:
            pair = r["pair"]
            lines += ([""] if lines else []) + [pair, head]
        lines.append(f"{r['state']:<10} {r['key']:<{width}} {r['norm_a']:>11.5g} {r['norm_b']:>11.5g} "
                     f"{r['delta']:>11.5g} {r['rel_delta']:>10.4g} {r['cosine']:>9.6f}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    from phoenix.eval.compare import FIELDS

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    tmp.replace(path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_heatmap(plt, rows: list[dict], path: Path) -> None:
    """``rel_delta`` of the weights: rows = layers, columns = layer parts; one panel per pair."""
    import numpy as np

    weight = [r for r in rows if r["state"] == "weight" and r["key"].startswith("layer_")]
    pairs = list(dict.fromkeys(r["pair"] for r in weight))
    layers = sorted({r["key"].split("/", 1)[0] for r in weight})
    parts = sorted({r["key"].split("/", 1)[1] for r in weight})
    fig, axes = plt.subplots(1, len(pairs), squeeze=False,
                             figsize=(1.2 + 0.9 * len(parts) * len(pairs), 1.5 + 0.35 * len(layers)))
    for ax, pair in zip(axes[0], pairs):
        grid = np.full((len(layers), len(parts)), np.nan)
        for r in weight:
            if r["pair"] == pair:
                layer, part = r["key"].split("/", 1)
                grid[layers.index(layer), parts.index(part)] = r["rel_delta"]
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(parts)), parts, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_title(f"||dW||/||W_A||: {pair}", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_histograms(plt, values: dict, labels: list[str], path: Path) -> None:
    """A row per name, a column per checkpoint, shared bins per row."""
    import numpy as np

    names = list(values)
    fig, axes = plt.subplots(len(names), len(labels), squeeze=False,
                             figsize=(2.8 * len(labels), 2.2 * len(names)))
    for row, name in zip(axes, names):
        finite = [v.numpy() for v in values[name] if v is not None]
        lo, hi = min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-12, 81)
        for ax, label, v in zip(row, labels, values[name]):
            if v is not None:
                ax.hist(v.numpy(), bins=bins)
            ax.set_title(f"{name}\n{label}", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per layer and part: ||dW||, ||dW||/||W_A|| and cosine(W_A, W_B) between "
                    "consecutive checkpoints (and of Adam's exp_avg/exp_avg_sq), any layouts.",
        epilog="example:\n  phoenix compare-checkpoints runs/quickstart/checkpoints/step_000100 "
               "runs/quickstart --out runs/quickstart/compare --hist layer_00/mlp/fc1 embedding")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="step_* folders, run folders (latest) or Hugging Face folders")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the CSV and PNGs")
    parser.add_argument("--hist", nargs="+", default=[], metavar="NAME",
                        help="parts to histogram, e.g. layer_01/mlp/fc1 embedding exp_avg:layer_01/mlp/fc1")
    parser.add_argument("--weights-only", action="store_true", help="skip the Adam states")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from phoenix.checkpoint.store import CheckpointError
    from phoenix.config import ConfigError
    from phoenix.convert.common import ConversionError
    from phoenix.eval import compare as cmp

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="phoenix-compare-") as scratch:
        try:
            if len(args.checkpoints) < 2:
                raise cmp.CompareError(f"give at least two checkpoints, got {len(args.checkpoints)}")
            resolved = [_resolve(a, Path(scratch), i) for i, a in enumerate(args.checkpoints)]
            labels = _labels([label for _, label in resolved])
            ckpts = [cmp.Checkpoint.open(p, label) for (p, _), label in zip(resolved, labels)]
            for a, b in zip(ckpts, ckpts[1:]):
                cmp.check_same_architecture(a, b)
            known = set(cmp.part_names(ckpts[0]))
            bad = [n for n in args.hist if n not in known]
            if bad:
                raise cmp.CompareError(f"--hist {bad[0]}: no such part (e.g. "
                                       f"{', '.join(sorted(known)[:3])}, ...)")
            if out.exists() and not out.is_dir():
                raise cmp.CompareError(f"--out {out}: exists and is not a folder")
            states = ("weight",) if args.weights_only else cmp.STATES
            rows, values = cmp.compare(ckpts, states, args.hist, progress=sys.stderr.isatty())
        except (cmp.CompareError, CheckpointError, ConversionError, ConfigError, OSError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    for c in ckpts:
        note = "" if c.optim else (
            " (optimizer state not compared: it is stored per data-parallel shard, "
            "checkpoint.optimizer_format dp_reshardable; `phoenix reshard` writes it per "
            "parameter)" if any(k.startswith("optimizer.") for k in c.stored)
            else " (no optimizer state)")
        print(f"{c.label}: {c.path}{note}")
    print(format_table(rows))
    write_csv(rows, out / "compare.csv")
    print(f"wrote {out / 'compare.csv'}")
    plt = _pyplot()
    if plt is None:
        print(f"{PROG}: matplotlib is not installed; wrote only the CSV (pip install matplotlib "
              f"for heatmap.png/hist.png)", file=sys.stderr)
        return 0
    write_heatmap(plt, rows, out / "heatmap.png")
    print(f"wrote {out / 'heatmap.png'}")
    if values:
        write_histograms(plt, values, labels, out / "hist.png")
        print(f"wrote {out / 'hist.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
