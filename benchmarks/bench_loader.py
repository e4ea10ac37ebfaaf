#!/usr/bin/env python
"""Loader throughput: phoenix's plan-driven sample reads vs megatron-core's GPTDataset.

Both read the same ``.bin/.idx`` (random tokens, random document lengths) at the same
sequence length, in the same process; each result is printed as ``name=value``:

    python benchmarks/bench_loader.py [--seq-length 4096] [--tokens 200000000] [--samples 20000]

``megatron_samples_per_s`` times ``GPTDataset.__getitem__`` (what Megatron-LM's loader
calls per sample); ``phoenix_samples_per_s`` times ``PlanSource.sample`` over a data plan
of the same dataset (what phoenix's loader calls per sample). Both return tokens,
labels, loss mask and position ids. Indices are visited in the order each loader would
use them for training (megatron: its shuffled sample index; phoenix: plan order).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_prefix(path: str, tokens: int, vocab: int, seed: int) -> None:
    from phoenix.data.indexed import indexed_dataset_module

    idx = indexed_dataset_module()
    rng = np.random.default_rng(seed)
    builder = idx.IndexedDatasetBuilder(path + ".bin", dtype=idx.DType.optimal_dtype(vocab))
    import torch

    written = 0
    while written < tokens:
        n = int(rng.integers(200, 8000))
        doc = rng.integers(3, vocab, size=n, dtype=np.int64)
        doc[-1] = 2
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
        written += n
    builder.finalize(path + ".idx")


class _Tok:
    def __init__(self, vocab):
        self.vocab_size, self.eod, self.pad = vocab, 2, -1

    @property
    def unique_identifiers(self):
        return {"class": "bench", "vocab_size": self.vocab_size}


def megatron_dataset(prefix, seq, num_samples, cache):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(random_seed=1, sequence_length=seq, blend=([prefix], None),
                              split="100,0,0", path_to_cache=cache, tokenizer=_Tok(32000),
                              reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, create_attention_mask=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True,
                                                config).build()
    return train


def timed(fn, n):
    fn(0)  # warm the page cache for both the same way
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=200_000_000)
    ap.add_argument("--samples", type=int, default=20_000)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    from phoenix.data.plan_source import PlanSource, load_or_build_plan
    from phoenix.testing.plan_specs import PlanDatasetSpec, build_indices, plan_inputs

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench")
        make_prefix(prefix, args.tokens, 32000, seed=0)
        n = args.samples
        mega = megatron_dataset(prefix, args.seq_length, n, tmp)
        specs = [PlanDatasetSpec("bench", prefix, 1.0)]
        indices = build_indices(specs, args.seq_length)
        batches = -(-n // 64)
        plan, _ = load_or_build_plan(plan_inputs(specs, indices, 64, batches, seed=1), tmp)
        source = PlanSource(plan, indices, eod_id=2)
        m = min(n, len(mega), len(source))
        mega_rate = timed(lambda i: mega[i], m)
        phx_rate = timed(lambda i: source.sample(i), m)
        print(f"seq_length={args.seq_length}")
        print(f"samples_timed={m}")
        print(f"megatron_samples_per_s={mega_rate:.1f}")
        print(f"phoenix_samples_per_s={phx_rate:.1f}")
        print(f"loader_speedup_vs_megatron={phx_rate / mega_rate:.2f}")


if __name__ == "__main__":
    main()
