"""``phoenix score-data CHECKPOINT PREFIX --out SCORES [k=v ...]``: score every document of
an indexed dataset with a checkpoint, and optionally write the dataset without its worst
documents.

Per document: mean token loss, perplexity, Min-K% probability (``--min-k``, default 20)
and the number of scored tokens, computed as :mod:`phoenix.eval.score_data` describes
(each document on its own; documents longer than ``--seq-length`` in overlapping windows
``--stride`` tokens apart, every token scored once). The model, tokenizer and RoPE come
from the checkpoint's ``config.yaml`` (as ``phoenix generate``), ``k=v`` overrides apply on
top. Layout: one pipeline stage and TP=1 unless overridden; every process beyond that is
data parallel and takes its share of the documents (``phoenix torchrun --nproc-per-node 4
-m phoenix.cli score-data ...``; ``parallel.tensor=2`` / ``parallel.pipeline=2`` work too).

Outputs (rank 0; each written to a temporary name and renamed):

* ``SCORES.npz``: arrays ``loss``, ``ppl``, ``min_k`` (float64) and ``tokens`` (int64),
  one entry per document in dataset order (NaN for a document with no scored token);
* ``SCORES.json``: the checkpoint (path, step, fingerprint), the tokenizer (fingerprint),
  the prefix, the settings, the layout and summary statistics (and the ``--keep`` result).

``--keep F --keep-out OUT``: write the prefix ``OUT`` (.bin/.idx, .meta.json, and
.groups.npy when PREFIX has groups) with the lowest-loss ``F`` of the documents: by
document, or, when PREFIX has document groups, by whole groups ranked by their
token-weighted mean loss, best first until at least ``ceil(F * documents)`` are kept
(:func:`phoenix.eval.score_data.keep_mask`). Exit status 0, or 2 (one line) on a bad
argument, checkpoint, prefix or tokenizer mismatch, before any scoring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

DEFAULT_LAYOUT = ("parallel.pipeline=1", "parallel.virtual_pipeline=null", "parallel.tensor=1",
                  "parallel.context=1",
                  "parallel.expert=1", "parallel.expert_tensor=null",
                  "parallel.sequence_parallel=false", "parallel.overlap_grad_reduce=false",
                  "parallel.overlap_param_gather=false", "train.micro_batch_size=1",
                  "checkpoint.init_from=null", "logging.tensorboard=false")
"""Set before the user's overrides: data parallel over every process, no training-only
machinery (``train.global_batch_size`` = WORLD_SIZE only keeps the config valid)."""


def checkpoint_fingerprint(path: Path) -> str:
    """16 hex digits identifying a checkpoint folder without reading its weights: a
    SHA-256 of its state bundle (step, trainer state), its dist_checkpointing metadata and
    the name and size of every file."""
    h = hashlib.sha256()
    for name in ("phoenix_state.pt", ".metadata", "metadata.json"):
        if (path / name).is_file():
            h.update((path / name).read_bytes())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _out_paths(out: str) -> tuple[Path, Path]:
    base = Path(out[:-4] if out.endswith(".npz") else out)
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def _write_outputs(scores: dict, npz: Path, sidecar: Path, report: dict) -> None:
    import numpy as np

    from phoenix.io import atomic_write_text

    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_name(f".{npz.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **scores)
    os.replace(tmp, npz)
    atomic_write_text(sidecar, json.dumps(report, indent=2) + "\n")


def _summary(scores: dict) -> dict:
    import numpy as np

    loss = scores["loss"][np.isfinite(scores["loss"])]
    if not len(loss):
        return {"documents_scored": 0}
    return {"documents_scored": int(len(loss)), "tokens_scored": int(scores["tokens"].sum()),
            "loss_mean": float(loss.mean()), "loss_median": float(np.median(loss)),
            "loss_p90": float(np.quantile(loss, 0.9)),
            "token_weighted_loss": float(np.nansum(scores["loss"] * scores["tokens"])
                                         / max(int(scores["tokens"].sum()), 1))}


def score(args) -> dict | None:
    """Collective: check the inputs, load the model, score; rank 0 writes the outputs and
    returns the report (None elsewhere)."""
    import numpy as np

    from phoenix.checkpoint import load_model, trained_stage
    from phoenix.checkpoint.store import resolve_checkpoint, step_of
    from phoenix.config import ConfigError
    from phoenix.config.loader import load_saved_config
    from phoenix.data.indexed import DataError, check_prefix, check_tokenizer
    from phoenix.data.subset import read_groups, write_subset
    from phoenix.eval.score_data import DocumentReader, DocumentScorer, ScoreSettings, keep_mask
    from phoenix.runtime import init_runtime
    from phoenix.tokenizer import load_tokenizer, model_vocab_size

    if args.keep is not None and not 0 < args.keep <= 1:
        raise ConfigError(f"--keep {args.keep}: the fraction of documents to keep, in (0, 1]")
    if (args.keep is None) != (args.keep_out is None):
        raise ConfigError("--keep and --keep-out go together (the fraction kept and the new prefix)")
    if args.keep_out and os.path.abspath(args.keep_out) == os.path.abspath(args.prefix):
        raise ConfigError(f"--keep-out {args.keep_out}: must differ from PREFIX")
    path = resolve_checkpoint(args.checkpoint)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_saved_config(path / "config.yaml", [*DEFAULT_LAYOUT, f"train.global_batch_size={world}",
                                                   *args.overrides])
    tokenizer = load_tokenizer(cfg.tokenizer)
    facts = check_prefix(args.prefix)
    check_tokenizer(args.prefix, tokenizer, "PREFIX", f"the checkpoint's ({path / 'config.yaml'})")
    vocab_size = model_vocab_size(cfg, tokenizer)
    reader = DocumentReader(args.prefix)
    if reader.max_token() >= vocab_size:
        raise DataError(f"data prefix '{args.prefix}': token id {reader.max_token()} is outside the "
                        f"model's vocabulary ({vocab_size})")
    seq = (args.seq_length if args.seq_length is not None  # 0 is refused below, not a default
           else trained_stage(cfg, step_of(path)).seq_length)
    if seq > cfg.model.max_seq_length:
        raise ConfigError(f"--seq-length {seq}: exceeds model.max_seq_length {cfg.model.max_seq_length}")
    settings = ScoreSettings(seq_length=seq, stride=(args.stride if args.stride is not None
                                                               else max(seq // 2, 1)),
                             micro_batch_size=args.micro_batch_size, min_k=args.min_k)
    if settings.problems():
        raise ConfigError(settings.problems()[0])
    groups = read_groups(args.prefix, len(reader)) if args.keep is not None else None

    layout = init_runtime(cfg)
    model = load_model(path, cfg, layout, vocab_size=vocab_size)
    scores = DocumentScorer(model, layout, vocab_size, tokenizer.eod_id, settings).score(
        reader, progress=True)
    if scores is None:
        return None
    npz, sidecar = _out_paths(args.out)
    report = {"checkpoint": {"path": str(path), "step": step_of(path),
                             "fingerprint": checkpoint_fingerprint(path)},
              "tokenizer": {"file": getattr(tokenizer, "model_file", None),
                            "fingerprint": tokenizer.fingerprint},
              "prefix": os.path.abspath(args.prefix), "documents": facts["num_documents"],
              "settings": settings.to_dict(), "vocab_size": vocab_size, "layout": layout.describe(),
              "arrays": {"file": str(npz), "names": ["loss", "ppl", "min_k", "tokens"]},
              "summary": _summary(scores)}
    if args.keep is not None:
        keep = keep_mask(scores["loss"], scores["tokens"], args.keep, groups)
        dropped = scores["loss"][~keep]
        record = {"keep": args.keep, "by": "group" if groups is not None else "document",
                  "scores": str(npz), "checkpoint_fingerprint": report["checkpoint"]["fingerprint"],
                  "documents_kept": int(keep.sum()), "documents_dropped": int((~keep).sum()),
                  "lowest_dropped_loss": float(np.nanmin(dropped)) if np.isfinite(dropped).any() else None}
        meta = write_subset(args.prefix, args.keep_out, keep, record, progress=True)
        report["keep"] = {**record, "prefix": os.path.abspath(args.keep_out),
                          "num_tokens": meta["num_tokens"], "num_groups": meta.get("num_groups")}
    _write_outputs(scores, npz, sidecar, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="phoenix score-data", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-document loss, perplexity and Min-K%% probability of an indexed dataset "
                    "under a checkpoint (any layout; launch under phoenix torchrun for several "
                    "processes); --keep writes the dataset without its highest-loss documents.",
        epilog="example:\n  phoenix score-data runs/quickstart data/quickstart/web --out "
               "runs/quickstart/scores/web --keep 0.9 --keep-out data/quickstart/web_kept")
    parser.add_argument("checkpoint", help="step_* folder, run folder (latest) or converted folder")
    parser.add_argument("prefix", help="the .bin/.idx prefix to score")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=2")
    parser.add_argument("--out", required=True, metavar="SCORES",
                        help="writes SCORES.npz and SCORES.json")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens per window (default: the checkpoint's stage seq_length)")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts (default seq_length // 2)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward")
    parser.add_argument("--min-k", type=float, default=20.0, help="percent for Min-K%% (default 20)")
    parser.add_argument("--keep", type=float, default=None, metavar="FRACTION",
                        help="fraction of documents to keep (lowest loss) in --keep-out")
    parser.add_argument("--keep-out", default=None, metavar="PREFIX", help="the filtered prefix")
    args = parser.parse_intermixed_args(argv)

    from phoenix.checkpoint.store import CheckpointError
    from phoenix.data.indexed import DataError
    from phoenix.runtime.command import run_command, setup_logging

    setup_logging()
    result = {}
    code = run_command(lambda: result.update(report=score(args)), (DataError, CheckpointError))
    if code or result.get("report") is None:
        return code
    report = result["report"]
    s = report["summary"]
    print(f"scored {s['documents_scored']} of {report['documents']} documents of {report['prefix']} "
          f"with {report['checkpoint']['path']} ({report['layout']})")
    if s["documents_scored"]:
        print(f"loss: mean {s['loss_mean']:.4f}, median {s['loss_median']:.4f}, p90 "
              f"{s['loss_p90']:.4f}; token-weighted {s['token_weighted_loss']:.4f}")
    print(f"wrote {report['arrays']['file']} and its .json sidecar")
    if "keep" in report:
        k = report["keep"]
        print(f"kept {k['documents_kept']} documents ({k['documents_dropped']} dropped, by {k['by']}) "
              f"in {k['prefix']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
