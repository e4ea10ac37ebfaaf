#!/usr/bin/env python
"""Data start-up at scale: phoenix's cached sample indices and plan vs megatron-core's
``BlendedMegatronDatasetBuilder``/``GPTDataset`` with its cache, in one run.

Eight datasets of sparse ``.bin`` files (``truncate``: no disk blocks) with ``.idx`` of
lognormal document lengths (mean ~2k tokens); one ("code") has groups of 1 + geometric
documents (mean 8, like repositories). The plan covers one pass over all samples at the
datasets' token shares. ``--scale 1`` is 8B tokens, 4M documents (80 MB of ``.idx``);
disk use is ~40 bytes per document plus ~40 per sample of cache.

Every measurement runs in a fresh subprocess (one "rank"): time of the call only (the
imports of torch/megatron/phoenix are outside), peak RSS (``ru_maxrss``) and the
private (anonymous) resident memory the call added (``RssAnon`` from /proc):

    first build     phoenix: sample indices + plan, published to the cache;
                    megatron: builder.build() into an empty path_to_cache
    cached start    what every rank does at every start once the cache exists
    uncached start  phoenix as every rank did before (indices built in memory, the
                    plan read whole into memory as from the former .npz)
    read            samples/s of reading the first samples of the plan / the blend, a
                    second time (warm page cache: the readers' own cost)

    python benchmarks/bench_data_scale.py [--scale 1] [--seq-length 4096] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ["web", "code", "books", "papers", "math", "wiki", "forum", "legal"]
SHARES = np.array([0.40, 0.20, 0.12, 0.09, 0.07, 0.05, 0.04, 0.03])
TOKENS_PER_SCALE = 8e9
MEAN_DOC = 2000
GROUPED = "code"


def make_data(root: Path, scale: float, seed: int) -> dict:
    from phoenix.testing.scale_data import group_ids, lognormal_lengths, write_prefix

    rng = np.random.default_rng(seed)
    out = {}
    for name, share in zip(NAMES, SHARES):
        prefix = str(root / name)
        docs = max(100, int(scale * TOKENS_PER_SCALE * share / MEAN_DOC))
        write_prefix(prefix, lognormal_lengths(docs, MEAN_DOC, rng), sparse=True)
        if name == GROUPED:
            np.save(prefix + ".groups.npy", group_ids(docs, 8, rng))
        out[name] = prefix
    return out


# ------------------------------------------------------------------ in the subprocess
def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _specs(prefixes, pack_groups: int):
    from phoenix.testing.plan_specs import PlanDatasetSpec

    return [PlanDatasetSpec(n, prefixes[n], float(s), group_mode="batch" if n == GROUPED else "none",
                            pack_groups=pack_groups if n == GROUPED else 0)
            for n, s in zip(NAMES, SHARES)]


def phoenix_source(a, cache: str | None, build: bool, copy: bool = False):
    """(source, plan, indices) as a rank gets them; ``cache=None``: indices in memory."""
    from phoenix.data.plan_source import PlanSource, load_or_build_plan
    from phoenix.testing.plan_specs import build_indices, plan_inputs

    specs = _specs(a["prefixes"], a["pack_groups"])
    indices = build_indices(specs, a["seq_length"], cache_dir=cache)
    inputs = plan_inputs(specs, indices, a["batch_size"], a["num_batches"], seed=1)
    plan, _ = load_or_build_plan(inputs, a["plan_dir"], build=build)
    if copy:  # the former load: every array read whole into this process
        for k in ("dataset_ids", "sample_ids", "counts"):
            setattr(plan, k, np.array(getattr(plan, k)))
    return PlanSource(plan, indices, eod_id=2), plan, indices


class _Tok:
    vocab_size, eod, pad = 32000, 2, -1
    unique_identifiers = {"class": "bench", "vocab_size": 32000}


def megatron_source(a):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(random_seed=1, sequence_length=a["seq_length"],
                              blend=([a["prefixes"][n] for n in NAMES], [float(s) for s in SHARES]),
                              split="100,0,0", path_to_cache=a["megatron_cache"], tokenizer=_Tok(),
                              reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, create_attention_mask=False)
    n = a["num_batches"] * a["batch_size"]
    return BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, config).build()[0]


def child(phase: str, a: dict) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import importlib

    for module in ("megatron.core.datasets.blended_megatron_dataset_builder",
                   "megatron.core.datasets.gpt_dataset", "phoenix.data.plan_source",
                   "phoenix.testing.plan_specs"):
        importlib.import_module(module)  # imports outside the timing
    import torch.distributed as dist

    # megatron's BlendedDataset asks for the rank: a world of one, as a single rank sees it
    store = tempfile.mktemp(prefix="bench_data_scale.store.")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)

    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_anon = _rss_anon()
    t0 = time.perf_counter()
    if phase.startswith("phoenix"):
        source, plan, indices = phoenix_source(
            a, None if phase == "phoenix_uncached" else a["cache"], build=phase == "phoenix_build",
            copy=phase == "phoenix_uncached")
        read = source.sample
    else:
        dataset = megatron_source(a)
        read = dataset.__getitem__
    seconds = time.perf_counter() - t0
    out = dict(seconds=seconds, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               base_peak=base_peak, anon=_rss_anon() - base_anon)
    if phase in ("phoenix_cached", "megatron_cached"):
        n = a["read_samples"]
        for i in range(n):  # warm: the first touch of a sparse file's page costs the kernel
            read(i)         # more than the reader; time the readers, not the page faults
        t0 = time.perf_counter()
        for i in range(n):
            read(i)
        out["read_per_s"] = n / (time.perf_counter() - t0)
        out["anon_after_read"] = _rss_anon() - base_anon
    if phase == "phoenix_cached":
        from phoenix.data.plan_source import loss_bearing_fraction

        g = NAMES.index(GROUPED)
        out["loss_grouped"] = loss_bearing_fraction(plan, indices)[g]
        out["groups_fitting_split"] = int(plan.groups_fit_split.sum())
        out["groups_fitting"] = int(plan.groups_fit.sum())
        out["groups"] = int(plan.groups_total.sum())
        out["samples"] = int(len(plan.dataset_ids))
        out["packed_groups_split"] = packed_groups_split(plan, indices[g], g, a["batch_size"])
    dist.destroy_process_group()
    return out


def packed_groups_split(plan, index, d: int, B: int) -> int:
    """Groups inside units of >= 2 groups (group packing) whose unit spans > 1 batch:
    each such group may be split (must be 0; a unit is never larger than the fit limit)."""
    from phoenix.data.samples import groups_per_unit

    at = np.flatnonzero(np.asarray(plan.dataset_ids) == d)
    units = np.asarray(index.group_ids)[np.asarray(plan.sample_ids)[at]]
    n = int(index.group_ids[-1]) + 1
    lo, hi = np.full(n, np.iinfo(np.int64).max), np.full(n, -1)
    np.minimum.at(lo, units, at // B)
    np.maximum.at(hi, units, at // B)
    members = groups_per_unit(index)
    return int(members[(hi > lo) & (members >= 2)].sum())


# ------------------------------------------------------------------ the parent
def run(phase: str, a: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, json.dumps(a)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{phase} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], json.loads(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="x 8B tokens")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--read-samples", type=int, default=3000)
    ap.add_argument("--pack-groups", type=int, default=32,
                    help="group packing of the grouped dataset (pack_groups; 0: off)")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed")
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_scale."))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        prefixes = make_data(root, args.scale, seed=0)
        make_s = time.perf_counter() - t0
        tokens = sum(os.path.getsize(p + ".bin") // 2 for p in prefixes.values())
        docs = sum((os.path.getsize(p + ".idx") - 34) // 20 for p in prefixes.values())
        samples = tokens // args.seq_length
        a = dict(prefixes=prefixes, seq_length=args.seq_length, batch_size=args.batch_size,
                 num_batches=samples // args.batch_size, read_samples=args.read_samples,
                 pack_groups=args.pack_groups,
                 cache=str(root / "cache"), plan_dir=str(root / "cache"),
                 megatron_cache=str(root / "megatron_cache"))
        r = {p: run(p, a) for p in ("megatron_build", "megatron_cached", "phoenix_build",
                                    "phoenix_cached", "phoenix_uncached")}
        n = r["phoenix_cached"]["samples"]
        disk = sum(f.stat().st_blocks * 512 for f in root.rglob("*") if f.is_file())
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    mb = 2 ** 20
    print(f"scale={args.scale}")
    print(f"tokens={tokens}")
    print(f"documents={docs}")
    print(f"planned_samples={n}")
    print(f"groups={r['phoenix_cached']['groups']}  # units of groups with pack_groups")
    print(f"pack_groups={args.pack_groups}")
    print(f"make_data_s={make_s:.1f}")
    print(f"disk_used_mb={disk / mb:.0f}")
    for who in ("phoenix", "megatron"):
        print(f"{who}_first_build_s={r[who + '_build']['seconds']:.2f}")
        print(f"{who}_first_build_peak_rss_mb={r[who + '_build']['peak'] / mb:.0f}")
        print(f"{who}_cached_startup_s={r[who + '_cached']['seconds']:.3f}")
        print(f"{who}_cached_peak_rss_mb={r[who + '_cached']['peak'] / mb:.0f}")
        print(f"{who}_cached_private_mb={r[who + '_cached']['anon'] / mb:.1f}")
        print(f"{who}_read_samples_per_s={r[who + '_cached']['read_per_s']:.0f}")
    print(f"baseline_peak_rss_mb={r['phoenix_cached']['base_peak'] / mb:.0f}  # after imports")
    print(f"phoenix_uncached_startup_s={r['phoenix_uncached']['seconds']:.3f}")
    print(f"phoenix_uncached_private_mb={r['phoenix_uncached']['anon'] / mb:.1f}")
    print(f"startup_speedup_vs_megatron={r['megatron_cached']['seconds'] / r['phoenix_cached']['seconds']:.2f}")
    print(f"first_build_speedup_vs_megatron={r['megatron_build']['seconds'] / r['phoenix_build']['seconds']:.2f}")
    print(f"read_speedup_vs_megatron={r['phoenix_cached']['read_per_s'] / r['megatron_cached']['read_per_s']:.2f}")
    print(f"plan_resident_bytes_per_sample={r['phoenix_cached']['anon'] / n:.3f}")
    print(f"megatron_resident_bytes_per_sample={r['megatron_cached']['anon'] / n:.3f}")
    print(f"phoenix_uncached_resident_bytes_per_sample={r['phoenix_uncached']['anon'] / n:.2f}")
    print(f"plan_resident_bytes_per_sample_after_read={r['phoenix_cached']['anon_after_read'] / n:.3f}")
    print(f"loss_bearing_fraction_grouped={r['phoenix_cached']['loss_grouped']:.4f}")
    print(f"groups_fitting={r['phoenix_cached']['groups_fitting']}")
    print(f"groups_fitting_split={r['phoenix_cached']['groups_fitting_split']}")
    print(f"packed_groups_split={r['phoenix_cached']['packed_groups_split']}")


if __name__ == "__main__":
    main()
