"""``phoenix inspect-batch``: print the documents that made up one global batch of a
run, from its data plan alone.

    phoenix inspect-batch RUN_DIR STEP [--samples N] [--chars 300] [--json]

``STEP`` is the 1-based optimizer step as the logs, TensorBoard and ``spikes.jsonl``
show it; it trained on plan batch ``STEP - 1``. For each sample of the batch (in plan
order, i.e. position ``j`` of the global batch; DP rank r trains positions
``[r*mbs, (r+1)*mbs)`` of every run of ``mbs*dp`` positions) it prints the dataset, the
sample id, its group (-1 when the dataset is not grouped), the document ids the sample
covers, and its decoded text (documents separated by ``<|eod|>``), cut to ``--chars``
characters (0: whole text); a token id outside the tokenizer's vocabulary shows as
``<|bad id N|>``. ``--json`` prints one JSON object per sample instead, with its token
ids (``token_ids``: what the training read, before the input/label shift) and whether
the step was skipped (``skipped``: ``train.skip_batches``).

Needs no GPU and no torch.distributed: the run's resolved ``RUN_DIR/config.yaml`` gives
the datasets, tokenizer, seq_length, global batch size, steps and seed, and where the run
was resumed with other data, the latest checkpoint's data history gives the config and
boundary each step was read with (:mod:`phoenix.cli.data_history`), so every step shows
what the run trained on, before and after such a resume; the sample
indices are rebuilt from the ``.bin/.idx`` files and the plan is loaded from the data
cache (``data.cache_dir``, else ``RUN_DIR/data_cache``, else the cache under the
config's ``output_dir``). If no cached plan exists it is rebuilt in memory (the plan is a
pure function of its inputs, so this is the same plan; nothing is written). Only runs
with ``data.sampler: plan`` have a plan.

Exit status 2 with a message for: a missing run directory or config.yaml, an invalid
config, missing data files, a step outside ``[1, train.steps]``, a megatron-sampler run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phoenix.runtime.command import HelpFormatter

EOD_MARK = "<|eod|>"


class InspectError(Exception):
    pass


def sample_documents(index, sample_id: int) -> list[int]:
    """Document ids covered by the sample's real tokens (first to last, inclusive)."""
    ids = []
    for bin_start, count in index.physical_ranges(int(index.starts[sample_id]),
                                                 int(index.lengths[sample_id])):
        ids += range(index.document_of(bin_start), index.document_of(bin_start + count - 1) + 1)
    return ids


def sample_token_ids(reader, sample_id: int) -> list[int]:
    """The real token ids of a sample (inputs plus the last label; no padding), as the
    training read them."""
    item = reader.read(sample_id)
    n = int(reader.index.lengths[sample_id])
    return [*item["tokens"].tolist(), int(item["labels"][-1])][:n]


def sample_text(ids: list[int], tokenizer, eod_id: int) -> str:
    """The decoded ``ids`` of a sample (:func:`sample_token_ids`), documents joined by
    ``<|eod|>`` (EOD tokens themselves are not decoded)."""
    pieces, current = [], []
    for t in ids:
        if t == eod_id:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    pieces.append(current)
    texts = [decode(tokenizer, p) for p in pieces]
    return EOD_MARK.join(texts)


def decode(tokenizer, ids: list[int]) -> str:
    """``tokenizer.decode(ids)``, except that an id outside the vocabulary (data tokenised
    with another tokenizer) shows as ``<|bad id N|>`` instead of failing the decode."""
    out, run = [], []
    for t in ids:
        if 0 <= t < tokenizer.vocab_size:
            run.append(t)
        else:
            out += [tokenizer.decode(run), f"<|bad id {t}|>"]
            run = []
    out.append(tokenizer.decode(run))
    return "".join(out)


def batch_samples(run_dir: str | Path, step: int, max_samples: int | None = None) -> dict:
    """What :func:`main` prints, as data: ``{"step", "batch", "num_batches", "counts",
    "stage", "skipped" (a step of ``train.skip_batches``: drawn, not trained),
    "data_resumed_at", "plan_path", "samples": [{position, dataset, dataset_id, sample_id, group_id,
    document_ids, tokens, token_ids, text}]}``. Raises InspectError for user errors."""
    from phoenix.config import ConfigError, load_config
    from phoenix.data.indexed import DataError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InspectError(f"run directory {run_dir} does not exist")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise InspectError(f"{config_path} does not exist (not a phoenix run directory?)")
    try:
        cfg = load_config(config_path)
    except (ConfigError, OSError) as e:
        raise InspectError(f"{config_path}: {e}") from None
    if cfg.data.sampler != "plan":
        raise InspectError(f"data.sampler is '{cfg.data.sampler}': only plan runs can be inspected")
    if not 1 <= step <= cfg.train.steps:
        raise InspectError(f"step {step} is not in [1, {cfg.train.steps}] (train.steps of this run; "
                           f"STEP is the 1-based optimizer step)")

    from phoenix.cli.data_history import data_segments, segment_at
    from phoenix.config.skip import skipped_steps
    from phoenix.data.plan import build_plan
    from phoenix.data.plan_cache import cache_dir, run_stage_plans
    from phoenix.data.plan_source import load_or_build_plan
    from phoenix.data.samples import SampleReader
    from phoenix.data.stage_plans import plan_at_step
    from phoenix.tokenizer import load_tokenizer

    candidates = [Path(cfg.data.cache_dir)] if cfg.data.cache_dir else [run_dir / "data_cache",
                                                                        cache_dir(cfg)]
    paths: list = []

    def get_plan(inputs):
        for directory in candidates:
            try:
                plan, path = load_or_build_plan(inputs, directory, build=False)
                paths.append(path)
                return plan
            except FileNotFoundError:
                continue
        print(f"phoenix inspect-batch: no cached plan in {', '.join(map(str, candidates))}; "
              f"rebuilding it in memory", file=sys.stderr)
        paths.append(None)
        return build_plan(inputs)

    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
        segment = segment_at(data_segments(run_dir, cfg, get_plan), step - 1)
        paths.clear()
        plans = run_stage_plans(segment.config, get_plan, resume=segment.resume,
                                recut=segment.recut)
    except ConfigError as e:
        raise InspectError(f"the run's data history: {e}") from None
    except ValueError as e:
        raise InspectError(f"data plan: {e}") from None
    except (DataError, OSError, RuntimeError) as e:
        raise InspectError(f"cannot rebuild the run's data inputs: {e}") from None
    spi, plan, k = plan_at_step(plans, step - 1)
    plan_path = paths[spi.stage.index]
    indices = spi.indices
    ds_ids, sample_ids = plan.batch(k)
    eod = tokenizer.eod_id
    readers: dict[int, SampleReader] = {}
    counts = {name: int(plan.counts[k, d]) for d, name in enumerate(plan.names)}
    samples = []
    for j, (d, s) in enumerate(zip(ds_ids.tolist(), sample_ids.tolist())):
        if max_samples is not None and j >= max_samples:
            break
        ix = indices[d]
        reader = readers.get(d) or readers.setdefault(d, SampleReader(ix, eod))
        ids = sample_token_ids(reader, s)
        samples.append({
            "position": j, "dataset": plan.names[d], "dataset_id": d, "sample_id": s,
            "group_id": int(ix.group_ids[s]) if ix.group_ids is not None else -1,
            "document_ids": sample_documents(ix, s),
            "tokens": int(ix.lengths[s]),
            "token_ids": ids,
            "text": sample_text(ids, tokenizer, eod),
        })
    return {"step": step, "batch": k, "num_batches": plan.num_batches, "counts": counts,
            "stage": spi.stage.name, "skipped": step in skipped_steps(cfg.train.skip_batches),
            "data_resumed_at": segment.resume.step if segment.resume is not None else None,
            "plan_path": str(plan_path) if plan_path else None, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="phoenix inspect-batch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("step", type=int, help="1-based optimizer step (plan batch STEP-1)")
    parser.add_argument("--samples", type=int, default=None,
                        help="show only the first N samples of the batch (default: all)")
    parser.add_argument("--chars", type=int, default=300,
                        help="cut each sample's text to this many characters (0: whole text)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample")
    args = parser.parse_args(argv)
    from phoenix.data.indexed import data_only_process

    data_only_process()  # a data tool: megatron-core without compiled kernels (start-up)
    if args.samples is not None and args.samples < 0 or args.chars < 0:
        print("phoenix inspect-batch: error: --samples and --chars must be >= 0", file=sys.stderr)
        return 2
    try:
        info = batch_samples(args.run_dir, args.step, args.samples)
    except InspectError as e:
        print(f"phoenix inspect-batch: error: {e}", file=sys.stderr)
        return 2

    def cut(text: str) -> str:
        return text if not args.chars or len(text) <= args.chars else text[:args.chars] + "..."

    if args.json:
        for s in info["samples"]:
            print(json.dumps({**s, "step": info["step"], "skipped": info["skipped"],
                              "text": cut(s["text"])}, ensure_ascii=False))
        return 0
    counts = ", ".join(f"{name} {n}" for name, n in info["counts"].items())
    resumed = info["data_resumed_at"]
    print(f"step {info['step']} = plan batch {info['batch']} of {info['num_batches']} "
          f"({counts}); plan {info['plan_path'] or '(rebuilt in memory)'}"
          + (f"; data as resumed at step {resumed}" if resumed is not None else "")
          + ("; SKIPPED: drawn but not trained (train.skip_batches)" if info["skipped"] else ""))
    for s in info["samples"]:
        docs = s["document_ids"]
        doc_text = str(docs[0]) if len(docs) == 1 else f"{docs[0]}-{docs[-1]}"
        print(f"\n[{s['position']}] dataset {s['dataset']}  sample {s['sample_id']}  "
              f"group {s['group_id']}  documents {doc_text}  tokens {s['tokens']}")
        print("    " + cut(s["text"]).replace("\n", "\n    "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
