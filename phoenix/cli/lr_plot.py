"""``phoenix lr-plot``: tabulate and plot a run's LR schedule before training with it.

    phoenix lr-plot CONFIG.yaml --out DIR [key=value ...]
    phoenix lr-plot --schedule-yaml SCHEDULE.yaml --out DIR [--tokens-per-step N] [key=value ...]

Writes ``DIR/lr.csv`` (``step,lr,stage,phase``: one row per optimizer step, 0-based;
``lr`` is the LR that step uses, written with ``repr`` so it reads back bit-exact;
``stage`` the recipe stage the step belongs to, empty without a run config) and
``DIR/lr.png`` (phase boundaries as dashed lines, stage boundaries as solid red ones,
both labelled) when matplotlib is importable. The schedule comes from the run config (``optim.schedule``, else the legacy
``optim`` fields: see :mod:`phoenix.config.resolved`), or from ``--schedule-yaml`` (a
file holding just a ScheduleConfig), which replaces the run's schedule if both are given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from phoenix.config.typed import ConfigError
from phoenix.io import atomic_write
from phoenix.config.schedule import ResolvedSchedule, ScheduleConfig, resolve
from phoenix.runtime.command import HelpFormatter

AFTER_END = "after-end"
"""``phase`` value of the rows past the last phase (the LR stays at its last value)."""


def load_schedule_yaml(path: str | os.PathLike, overrides: list[str] = ()) -> ScheduleConfig:
    """A ScheduleConfig from a YAML file holding just that section, with dotted overrides."""
    # The loader's YAML reader: it reads 1e-3 as a float (plain PyYAML gives a string).
    from phoenix.config.loader import parse_overrides, read_yaml
    from phoenix.config.typed import apply_override, from_dict

    data = read_yaml(path)
    for key, value in parse_overrides(overrides):
        apply_override(data, key, value)
    try:
        return from_dict(ScheduleConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def rows(resolved: ResolvedSchedule, num_steps: int, stage_of=None) -> list[tuple[int, float, str, str]]:
    """``(step, lr, stage name, phase label)`` for optimizer steps ``0 .. num_steps-1``;
    ``stage_of(step)`` names the stage (None: no stages, empty names)."""
    out = []
    for step in range(num_steps):
        phase = resolved.phase_at(step)
        out.append((step, resolved.lr_at(step), stage_of(step) if stage_of else "",
                    AFTER_END if phase is None else phase.label))
    return out


def write_csv(path: Path, table: list[tuple[int, float, str, str]]) -> None:
    lines = ["step,lr,stage,phase"] + [f"{s},{lr!r},{stage},{label}"
                                       for s, lr, stage, label in table]
    data = ("\n".join(lines) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def write_png(path: Path, resolved: ResolvedSchedule, table: list[tuple[int, float, str, str]],
              title: str, stages: list[tuple[str, int]] = ()) -> bool:
    """Plot the schedule; False (and a note on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("phoenix lr-plot: matplotlib is not installed; wrote only the CSV "
              "(pip install matplotlib for lr.png)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot([row[0] for row in table], [row[1] for row in table], lw=1.5)
    top = max(resolved.peak_lr, max((row[1] for row in table), default=0.0))
    for p in resolved.phases:
        ax.axvline(p.start_step, color="grey", ls="--", lw=0.8)
        ax.text((p.start_step + p.end_step) / 2, top * 1.02, p.label, ha="center", va="bottom",
                fontsize=8)
    ax.axvline(resolved.total_steps, color="grey", ls="--", lw=0.8)
    for name, start in stages:  # where the data mixture (and batch / sequence) changes
        ax.axvline(start, color="tab:red", lw=1.2)
        ax.text(start, top * 0.03, f" {name}", color="tab:red", ha="left", va="bottom",
                fontsize=8, rotation=90)
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    fig.tight_layout()

    def save(f):
        fig.savefig(f, format="png", dpi=120)

    try:
        atomic_write(path, save)
    finally:
        plt.close(fig)
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="phoenix lr-plot",
                                description="Write the LR schedule of a run as lr.csv and lr.png.")
    p.add_argument("args", nargs="*", default=[], metavar="CONFIG.yaml [key=value ...]",
                   help="run config and dotted overrides (overrides apply to --schedule-yaml "
                        "when no run config is given)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--schedule-yaml", help="a YAML file with just a ScheduleConfig")
    p.add_argument("--tokens-per-step", type=int,
                   help="for token-length phases without a run config")
    p.add_argument("--steps", type=int,
                   help="rows to write (default: the longer of the schedule and train.steps)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    # Intermixed: "CONFIG --out DIR key=value" puts positionals on both sides of options.
    args = _parser().parse_intermixed_args(argv)
    config = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if config else args.args
    if config is None and args.schedule_yaml is None:
        print("phoenix lr-plot: give a run config or --schedule-yaml", file=sys.stderr)
        return 2
    try:
        cfg = None
        if config is not None:
            from phoenix.config import load_config

            cfg = load_config(config, overrides)
        if args.schedule_yaml:
            schedule = load_schedule_yaml(args.schedule_yaml, [] if cfg else overrides)
            tokens_per_step = cfg.resolved.tokens_per_step if cfg else args.tokens_per_step
            resolved = resolve(schedule, tokens_per_step)
        else:  # exactly the schedule the trainer applies
            resolved = cfg.resolved.schedule
    except ConfigError as e:
        print(f"phoenix: config error: {e}", file=sys.stderr)
        return 2

    run_steps = cfg.train.steps if cfg else 0
    if cfg and run_steps != resolved.total_steps:
        print(f"note: the schedule spans {resolved.total_steps} steps but train.steps is "
              f"{run_steps}", file=sys.stderr)
    num_steps = args.steps or max(resolved.total_steps, run_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage_table = cfg.resolved.stages if cfg else None
    staged = stage_table is not None and stage_table.explicit
    table = rows(resolved, num_steps, (lambda k: stage_table.stage_at(k).name) if staged else None)
    write_csv(out / "lr.csv", table)
    if staged:
        print(stage_table.describe())
    print(resolved.phases_table())
    print(f"wrote {out / 'lr.csv'} ({num_steps} steps)")
    title = cfg.name if cfg else Path(args.schedule_yaml).stem
    if write_png(out / "lr.png", resolved, table, f"LR schedule: {title}",
                 stage_table.boundaries() if staged else ()):
        print(f"wrote {out / 'lr.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
