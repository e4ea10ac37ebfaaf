"""``phoenix eval CHECKPOINT CONFIG [k=v ...]``: evaluate a checkpoint on held-out sets.

Loads the model weights of ``CHECKPOINT`` (a ``step_*`` directory, or a run directory /
``checkpoints`` directory whose latest checkpoint is taken) into the model of ``CONFIG``
at the config's parallel layout (launch under torchrun with as many processes as the
layout needs; the checkpoint reshards), evaluates the config's ``eval.sets`` (or the
``--set NAME=PREFIX`` options, which replace them) exactly as training does
(:class:`phoenix.eval.Evaluator`), prints a table on rank 0 and, with ``--out FILE``,
writes the numbers as JSON::

    {"checkpoint": ".../step_000100", "step": 100, "layout": "world=2 tp=2 ...",
     "sets": {"web_val": {"name": "web_val", "prefix": "...", "samples": 256,
                          "tokens": 1048320, "loss": 2.91, "ppl": 18.4,
                          "top1": 0.43, "top5": 0.66}}}

With ``--needle`` (or an ``eval.needle`` section in CONFIG) the needle-in-a-haystack
eval (:mod:`phoenix.eval.needle`) runs too (alone when there are no sets): rank 0 prints
the accuracy table (depth x length), writes the heatmap to
``<output_dir>/needle/step_XXXXXXX.png`` (or ``--needle-png FILE``) and adds
``"needle": {"lengths", "depths", "accuracy", "by_length", "mean", "hits", "counts",
"prompts"}`` to the JSON (``prompts``: per prompt its length, depth, trial, passkey, the
generated text, the number read from it and whether it was right). ``--needle-lengths/-depths/-trials/-haystack`` replace those keys of
``eval.needle``; without ``eval.needle``, ``--needle-haystack`` is required. The lengths
default to powers of two up to the sequence length of the checkpoint's stage. It needs one
pipeline stage (``parallel.pipeline=1``).

The run's own ``config.yaml`` (in the run directory and in every checkpoint) is a valid
CONFIG. Exit status: 0, or 2 on a config, data or checkpoint error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from phoenix.io import atomic_write_text
from phoenix.runtime.command import HelpFormatter

log = logging.getLogger("phoenix.eval")


def _parse_set(text: str):
    from phoenix.config import ConfigError
    from phoenix.config.eval import EvalSetConfig

    name, sep, prefix = text.partition("=")
    if not sep:
        name, prefix = None, text
    try:
        return EvalSetConfig(prefix=prefix, name=name or None)
    except ConfigError as e:
        raise ConfigError(f"--set {text}: {e}") from None


def _number_list(flag: str, text: str, kind):
    from phoenix.config import ConfigError

    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def needle_config_of(base, *, enable=False, lengths=None, depths=None, trials=None,
                     haystack=None):
    """``eval.needle`` (``base``: the config's, or None) with the command-line replacements;
    None when the needle eval is neither configured nor asked for."""
    from dataclasses import asdict

    from phoenix.config import ConfigError
    from phoenix.config.eval import NeedleConfig

    given = {k: v for k, v in dict(
        haystack_prefix=haystack,
        lengths=None if lengths is None else _number_list("--needle-lengths", lengths, int),
        depths=None if depths is None else _number_list("--needle-depths", depths, float),
        trials=trials).items() if v is not None}
    if base is None and not (enable or given):
        return None
    if base is None and "haystack_prefix" not in given:
        raise ConfigError("eval.needle.haystack_prefix: not set; add eval.needle to the config "
                          "or pass --needle-haystack PREFIX")
    try:
        return NeedleConfig(**{**(asdict(base) if base else {}), **given})
    except ConfigError as e:
        raise ConfigError(f"eval.needle.{e}") from None


def eval_config_of(cfg, sets=(), max_samples=None, micro_batch_size=None, needle=None):
    """The run config's ``eval`` section with the command-line replacements applied
    (``needle``: the NeedleConfig from :func:`needle_config_of`)."""
    from phoenix.config import ConfigError
    from phoenix.config.eval import EvalConfig

    base = getattr(cfg, "eval", None)
    if not sets and base is None and needle is None:
        raise ConfigError("eval.sets: no eval sets; add an eval section to the config or pass "
                          "--set NAME=PREFIX (or --needle)")
    try:
        return EvalConfig(
            needle=needle,
            sets=list(sets) or (base.sets if base else []),
            interval=base.interval if base else 0,
            at_end=base.at_end if base else True,
            max_samples=max_samples if max_samples is not None
            else (base.max_samples if base else EvalConfig.max_samples),
            micro_batch_size=micro_batch_size or (base.micro_batch_size if base else None))
    except ConfigError as e:
        raise ConfigError(f"eval.{e}") from None


def evaluate_checkpoint(checkpoint, cfg, eval_cfg) -> dict:
    """Collective: load ``checkpoint``'s weights into ``cfg``'s model on this rank and
    evaluate; returns the JSON-ready report (the same on every rank; ``"needle"`` only
    with ``eval_cfg.needle``)."""
    from phoenix.checkpoint import load_model, trained_stage
    from phoenix.checkpoint.store import resolve_checkpoint, step_of
    from phoenix.config import ConfigError
    from phoenix.eval.inputs import check_eval_inputs
    from phoenix.eval.evaluator import Evaluator
    from phoenix.runtime import init_runtime
    from phoenix.tokenizer import load_tokenizer, model_vocab_size

    path = resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_eval_inputs(eval_cfg, tokenizer)
    try:
        layout = init_runtime(cfg)
    except ConfigError as e:
        if not str(e).startswith("parallel"):
            raise
        raise ConfigError(f"{e}; phoenix eval may use any layout (checkpoints reshard): "
                          f"override it, e.g. parallel.pipeline=1 parallel.tensor=1") from None
    vocab_size = model_vocab_size(cfg, tokenizer)
    model = load_model(path, cfg, layout, vocab_size=vocab_size)  # with the trained RoPE
    step = step_of(path)
    stage = trained_stage(cfg, step)
    if layout.rank == 0:
        log.info("eval: %s (step %s) on %s", path, step, layout.describe())
    # At the sequence length of that stage, as the in-training eval does.
    results = Evaluator.from_run_config(model, layout, cfg, eval_cfg, tokenizer,
                                        seq_length=stage.seq_length).evaluate()
    report = {"checkpoint": str(path), "step": step, "layout": layout.describe(),
              "sets": {name: r.to_dict() for name, r in results.items()}}
    if eval_cfg.needle is not None:
        from phoenix.eval.needle_run import NeedleEvaluator

        needle = NeedleEvaluator(model, layout, eval_cfg.needle, tokenizer, vocab_size=vocab_size,
                                 micro_batch_size=eval_cfg.micro_batch_size
                                 or cfg.train.micro_batch_size)
        report["needle"] = needle.evaluate(stage.seq_length).to_dict()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="phoenix eval",
        description="Evaluate a checkpoint on held-out sets: loss, perplexity, top-1/top-5 "
                    "next-token accuracy; with --needle, the needle-in-a-haystack (passkey "
                    "retrieval) test. Launch under torchrun for a parallel layout.")
    parser.add_argument("checkpoint", help="checkpoint directory (step_*), or a run directory")
    parser.add_argument("config", help="run config YAML (e.g. the run's config.yaml)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="dotted overrides, e.g. parallel.tensor=2")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=PREFIX",
                        help="an eval set (repeatable); replaces the config's eval.sets")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="samples per set (default: eval.max_samples; 0: whole set)")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    needle = parser.add_argument_group("needle in a haystack (passkey retrieval)")
    needle.add_argument("--needle", action="store_true",
                        help="run the needle eval (also on when the config has eval.needle)")
    needle.add_argument("--needle-lengths", default=None, metavar="N,N,...",
                        help="context lengths in tokens (default: powers of two up to the "
                             "stage's seq_length)")
    needle.add_argument("--needle-depths", default=None, metavar="D,D,...",
                        help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    needle.add_argument("--needle-trials", type=int, default=None, metavar="N",
                        help="prompts per (length, depth) cell (default 4)")
    needle.add_argument("--needle-haystack", default=None, metavar="PREFIX",
                        help="tokenised .bin/.idx prefix of the filler text")
    needle.add_argument("--needle-png", default=None, metavar="FILE",
                        help="heatmap file (default <output_dir>/needle/step_XXXXXXX.png)")
    args = parser.parse_intermixed_args(argv)

    from phoenix.config import ConfigError, load_config
    from phoenix.eval.evaluator import EvalResult, format_table
    from phoenix.checkpoint.store import CheckpointError
    from phoenix.data.indexed import DataError
    from phoenix.runtime.command import run_command, setup_logging

    setup_logging()
    result = {}

    def body():
        cfg = load_config(args.config, args.overrides)
        needle_cfg = needle_config_of(
            cfg.eval.needle if cfg.eval else None, enable=args.needle,
            lengths=args.needle_lengths, depths=args.needle_depths, trials=args.needle_trials,
            haystack=args.needle_haystack)
        for i, n in enumerate((needle_cfg.lengths or []) if needle_cfg else []):
            if n > cfg.model.max_seq_length:
                raise ConfigError(f"eval.needle.lengths[{i}]: {n} exceeds model.max_seq_length "
                                  f"{cfg.model.max_seq_length}")
        eval_cfg = eval_config_of(cfg, [_parse_set(s) for s in args.sets], args.max_samples,
                                  args.micro_batch_size, needle_cfg)
        result["report"] = evaluate_checkpoint(args.checkpoint, cfg, eval_cfg)
        result["cfg"] = cfg

    code = run_command(body, (DataError, CheckpointError))
    if code:
        return code
    report = result["report"]
    if int(os.environ.get("RANK", "0")) == 0:
        results = {name: EvalResult(**r) for name, r in report["sets"].items()}
        print(f"checkpoint {report['checkpoint']} (step {report['step']}), {report['layout']}")
        if results:
            print(format_table(results), flush=True)
        if "needle" in report:
            from phoenix.eval.needle import NeedleResult, format_needle_table
            from phoenix.eval.needle_run import heatmap_path, write_heatmap

            needle_result = NeedleResult.from_dict(report["needle"])
            print(format_needle_table(needle_result), flush=True)
            png = Path(args.needle_png or heatmap_path(result["cfg"].output_dir, report["step"]))
            if write_heatmap(needle_result, png, f"needle accuracy, step {report['step']} "
                             f"(mean {needle_result.mean:.3f})") is not None:
                print(f"needle heatmap: {png}", flush=True)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
