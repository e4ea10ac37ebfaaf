"""Benchmark: Phoenix's data plan vs megatron-core's ``build_blending_indices``.

Both build the index of ``--samples`` samples (``K = samples // B`` global batches) for
the same normalised weights in the same process. Megatron's is a sequential greedy
blend (no shuffle); ours additionally shuffles every dataset per epoch, keeps the groups
of two datasets whole, and gives two small datasets min-share bursts.

Printed metrics (one ``name=value`` per line):
  megatron_blend_s / phoenix_plan_s     wall time of the build (ours: full build_plan,
                                        validation and fingerprint included)
  plan_build_speedup_vs_megatron        megatron_blend_s / phoenix_plan_s
  *_bytes_per_sample                    bytes of the stored index per planned sample
  *_max_batch_error                     max over batches k and non-burst datasets d of
                                        |c[k,d] - target[k,d]|, c = samples of d in batch k,
                                        target = w_d * B (megatron) and F_k * w_d / W_free
                                        (ours, F_k = slots not taken by bursts; = w_d * B
                                        when there are no bursts)
  *_max_prefix_error                    the same for the cumulative counts over batch prefixes
                                        (ours: datasets without flexible groups, against
                                        their share of the slots the grouped ones leave)
  phoenix_groups_whole_fraction         fitting groups (size <= ceil(v F_k)) kept whole
  phoenix_grouped_max_prefix_error      the grouped datasets' prefix error vs v * F_k
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import warnings

import numpy as np


def make_inputs(samples: int, num_datasets: int, batch_size: int, seed: int):
    from phoenix.data.plan import PlanDataset, PlanInputs

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_datasets + 1) ** 1.2      # Zipf-like mixture
    min_share = np.zeros(num_datasets)
    if num_datasets >= 4:                                       # two small datasets burst
        weights[-2:] = [0.004, 0.008]
        min_share[-2:] = 0.05
    weights /= weights.sum()
    datasets = []
    for d in range(num_datasets):
        # ~1.5 epochs of every dataset over the stage
        n = max(1, int(weights[d] * samples / 1.5))
        group_ids = None
        if d < 2 and num_datasets >= 3:                        # documents split into 1..32 samples
            sizes = rng.integers(1, 33, size=n // 16 + 1)
            group_ids = np.repeat(np.arange(len(sizes)), sizes)[:n]
        datasets.append(PlanDataset(f"ds{d}", n, float(weights[d]), float(min_share[d]),
                                    "batch" if group_ids is not None else "none", group_ids))
    return PlanInputs(datasets, batch_size, samples // batch_size, seed), weights


def per_batch_counts(dataset_ids: np.ndarray, num_batches: int, batch_size: int, num_datasets: int) -> np.ndarray:
    rows = dataset_ids[: num_batches * batch_size].reshape(num_batches, batch_size)
    return np.stack([(rows == d).sum(axis=1) for d in range(num_datasets)], axis=1)


def errors(counts: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(max per-batch error, max prefix error) of counts vs targets, both (K, D)."""
    diff = counts - target
    return float(np.abs(diff).max()), float(np.abs(np.cumsum(diff, axis=0)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100_000_000)
    ap.add_argument("--datasets", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2, help="builds per method; the fastest counts")
    args = ap.parse_args()

    with warnings.catch_warnings():           # megatron warns about optional CUDA deps
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp

    from phoenix.data.plan import build_plan

    inputs, weights = make_inputs(args.samples, args.datasets, args.batch_size, args.seed)
    B, K, D = args.batch_size, inputs.num_batches, args.datasets
    n = K * B

    # The first large allocation of a process is much slower (the kernel sets up huge
    # pages); touch as much memory as one index once so neither builder pays for it.
    warm = np.ones(n * 10 // 8 + 1, dtype=np.int64)
    del warm

    megatron_s = float("inf")
    for _ in range(args.repeat):
        dataset_index = np.zeros(n, dtype=np.int16)          # as megatron's BlendedDataset
        dataset_sample_index = np.zeros(n, dtype=np.int64)
        t0 = time.perf_counter()
        helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index, weights, D, n, False)
        megatron_s = min(megatron_s, time.perf_counter() - t0)
    megatron_bytes = (dataset_index.nbytes + dataset_sample_index.nbytes) / n
    mc = per_batch_counts(dataset_index, K, B, D)
    m_batch, m_prefix = errors(mc, np.broadcast_to(weights * B, mc.shape))
    del dataset_index, dataset_sample_index
    gc.collect()

    phoenix_s = float("inf")
    for _ in range(args.repeat):
        plan = None
        gc.collect()
        t0 = time.perf_counter()
        plan = build_plan(inputs, threads=args.threads)
        phoenix_s = min(phoenix_s, time.perf_counter() - t0)
    # Non-burst datasets without flexible groups: their share of the slots left by the
    # bursts and the flexible grouped datasets (whose count follows their whole groups).
    exact = ~plan.burst & ~plan.flexible
    left = plan.free_slots - plan.counts[:, plan.flexible].sum(axis=1)
    target = left[:, None] * (plan.weights / plan.weights[exact].sum())[None, :]
    p_batch, p_prefix = errors(plan.counts[:, exact].astype(np.float64), target[:, exact])
    whole = (plan.groups_fit - plan.groups_fit_split).sum() / max(1, plan.groups_fit.sum())
    flex = plan.flexible
    v = plan.weights[flex] / plan.weights[~plan.burst].sum()
    g_prefix = float(np.abs(np.cumsum(plan.counts[:, flex] - plan.free_slots[:, None] * v, axis=0)).max(initial=0))

    print(f"samples={n}")
    print(f"megatron_blend_s={megatron_s:.3f}")
    print(f"phoenix_plan_s={phoenix_s:.3f}")
    print(f"plan_build_speedup_vs_megatron={megatron_s / phoenix_s:.2f}")
    print(f"phoenix_bytes_per_sample={(plan.dataset_ids.nbytes + plan.sample_ids.nbytes) / n:.1f}")
    print(f"megatron_bytes_per_sample={megatron_bytes:.1f}")
    print(f"phoenix_max_batch_error={p_batch:.4f}")
    print(f"megatron_max_batch_error={m_batch:.4f}")
    print(f"phoenix_max_prefix_error={p_prefix:.6f}")
    print(f"megatron_max_prefix_error={m_prefix:.6f}")
    print(f"phoenix_allocator={plan.allocator}")
    print(f"phoenix_groups_whole_fraction={whole:.5f}")       # of the groups that fit
    print(f"phoenix_grouped_max_prefix_error={g_prefix:.3f}")  # bound: half the largest fitting group
    print(f"threads={args.threads}")
    for phase, seconds in plan.build_seconds.items():
        print(f"phoenix_{phase}_s={seconds:.3f}")


if __name__ == "__main__":
    main()
