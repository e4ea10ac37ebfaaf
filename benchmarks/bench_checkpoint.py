"""Benchmark: checkpoint saves, synchronous vs asynchronous, per optimizer format.

A GPT of ``--hidden``/``--layers`` (default 106M parameters, fp32, distributed optimizer
with torch Adam) on ``--dp`` gloo ranks of this machine's CPU; each rank saves the model and
optimizer through phoenix's ``CheckpointStore`` (``checkpoint.optimizer_format`` x
``checkpoint.async_save``): per case one store saves ``--saves`` checkpoints one after
another, as a run's checkpointer does, each removed after it is measured. The first save of
a store plans it (megatron's save plan and write distribution, with their collectives), the
second plans again and megatron checks that the plans agree, the third and later ones reuse
them: the *first* save and the *steady* state (the last save) are reported apart. A thread
samples the rank's resident memory (psutil RSS) every 2 ms during each save.

Printed metrics (one ``name=value`` per line, each the maximum over the ranks;
``<case>`` = ``dp<N>_<format>_<sync|async>``; without ``first_``: the last save):
  params / dp<N>_own_optimizer_shard_mb     model parameters; a rank's own shard of the
                                            optimizer state (fp32 main params + Adam moments)
  <case>[_first]_save_s                     wall time until the checkpoint is published
  <case>[_first]_blocked_s                  time training is held: the whole save when sync;
                                            when async, the call that plans/stages it plus
                                            the non-blocking polls (one per ``--step-s``) and
                                            the publication
  <case>[_first]_save_call_s                (async) the call that plans and stages the save
  <case>[_first]_cow_s                      (async) the extra time of the "training steps"
                                            while the writer runs, each of which writes the
                                            whole state in place (weights, gradients, Adam's
                                            moments): the fork's copy-on-write of the pages
                                            written (not in blocked_s)
  <case>_peak_extra_rss_mb                  peak RSS during a save less the RSS before it
                                            (the largest over the saves)
  dp<N>_<format>_peak_extra_rss_over_own_optimizer_shard   (sync; target <= 1.2 for periodic saves)
  dp<N>_<format>[_first]_async_blocked_over_sync_save      (target <= 0.10, steady state)
  dp<N>_<format>[_first]_async_blocked_and_cow_over_sync_save   the same with cow_s added

    PYTHONPATH=. python benchmarks/bench_checkpoint.py --dp 2 4
    PYTHONPATH=. python benchmarks/bench_checkpoint.py --dp 2 --formats dp_reshardable  # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import warnings

FORMATS = ("dp_reshardable", "fully_reshardable")


class PeakRss:
    """The peak resident memory of this process while the block runs (a sampling thread)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.base = 0

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def bench_config(out: str, hidden: int, layers: int, vocab: int) -> dict:
    return {
        "name": "bench-checkpoint", "output_dir": out, "runtime": {"device": "cpu"},
        "model": {"num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": hidden * 8 // 3,
                  "num_attention_heads": hidden // 64, "max_seq_length": 256, "vocab_size": vocab},
        "tokenizer": {"model": "none"},
        "data": {"seq_length": 64, "datasets": [{"prefix": "none", "name": "none"}]},
        "train": {"steps": 1, "global_batch_size": 8, "micro_batch_size": 1, "precision": "fp32"},
        "optim": {"lr": 1.0e-4}, "logging": {"tensorboard": False},
    }


def _own_shard_bytes(optimizer) -> int:
    """fp32 main parameters and Adam moments this rank's distributed optimizer holds."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                total += p.numel() * p.element_size()
                for v in inner.state.get(p, {}).values():
                    if hasattr(v, "numel") and v.dim() > 0:
                        total += v.numel() * v.element_size()
    return total


def _write_state(tensors: list) -> float:
    """Seconds to write every tensor in place (values unchanged), as a training step does
    (the backward pass the gradients, the optimizer step the weights and Adam's state):
    while the forked writer of an asynchronous save lives, each page written that the
    writer maps is first copied (copy-on-write), a cost the training steps pay and the save
    call does not."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for t in tensors:
            t.mul_(1.0)
    return time.perf_counter() - t0


def rank_bench(config: dict, formats: list[str], saves: int, step_s: float) -> dict:
    import torch.distributed as dist

    from phoenix.checkpoint.store import CheckpointStore
    from phoenix.checkpoint.writer_memory import training_tensors
    from phoenix.config import build_config
    from phoenix.model import build_model
    from phoenix.optim.builder import build_optimizer, ensure_optimizer_state
    from phoenix.runtime import init_runtime
    from phoenix.runtime.distributed import max_over_ranks

    warnings.filterwarnings("ignore")
    cfg = build_config(config)
    layout = init_runtime(cfg)
    model = build_model(cfg, layout, cfg.model.vocab_size)
    optimizer = build_optimizer(cfg, model, layout)
    ensure_optimizer_state(optimizer)  # the moments Adam makes at its first step
    out = {"params": sum(p.numel() for p in model[0].parameters()),
           f"own_optimizer_shard_mb": max_over_ranks(_own_shard_bytes(optimizer) / 2**20)}
    root = os.path.join(cfg.output_dir, "checkpoints")
    # one untimed save first: megatron's writer queue (a spawned Manager) starts once per job
    CheckpointStore(root, layout.rank, layout.world_size).save(
        0, model, None, {"format": 3, "step": 0, "states": {}}, "bench: true\n")
    tensors = training_tensors(model, optimizer)
    base = min(_write_state(tensors) for _ in range(3))  # an in-place write of the state
    step = 0
    for fmt in formats:
        for background in (False, True):
            case = f"{fmt}_{'async' if background else 'sync'}"
            store = CheckpointStore(root, layout.rank, layout.world_size)  # a run's store
            results = []
            for _ in range(saves):
                step += 1
                dist.barrier()
                with PeakRss() as rss:
                    t0 = time.perf_counter()
                    store.save(step, model, optimizer, {"format": 3, "step": step, "states": {}},
                               "bench: true\n", optimizer_format=fmt, background=background)
                    blocked = scheduled = time.perf_counter() - t0
                    cow = 0.0
                    while background:  # what the training loop does: poll once per "step"
                        time.sleep(step_s)  # a training step...
                        cow += _write_state(tensors) - base  # ...writes the whole state
                        dist.barrier()  # the step's collectives: the ranks wait for each other
                        t1 = time.perf_counter()
                        done = store.finish_pending(block=False)
                        blocked += time.perf_counter() - t1
                        if done is not None:
                            break
                    total = time.perf_counter() - t0
                results.append((max_over_ranks(total), max_over_ranks(blocked),
                                max_over_ranks(rss.extra_mb), max_over_ranks(scheduled),
                                max_over_ranks(cow)))
                dist.barrier()
                if layout.rank == 0:
                    shutil.rmtree(os.path.join(root, f"step_{step:06d}"), ignore_errors=True)
            for prefix, r in (("first_", results[0]), ("", results[-1])):
                out[f"{case}_{prefix}save_s"], out[f"{case}_{prefix}blocked_s"] = r[:2]
                if background:
                    out[f"{case}_{prefix}save_call_s"] = r[3]
                    out[f"{case}_{prefix}cow_s"] = r[4]
            out[f"{case}_peak_extra_rss_mb"] = max(r[2] for r in results)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--saves", type=int, default=3,
                   help="saves per case by one store (>= 3 reaches megatron's reused plans)")
    p.add_argument("--step-s", type=float, default=0.25,
                   help="seconds of a training step between two polls of an async save")
    args = p.parse_args()
    from phoenix.testing.distributed import run_distributed

    for dp in args.dp:
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as out:
            config = bench_config(out, args.hidden, args.layers, args.vocab)
            r = run_distributed(rank_bench, dp, config, args.formats, args.saves, args.step_s,
                                timeout=3600)[0]
        if dp == args.dp[0]:
            print(f"params={r.pop('params')}")
        else:
            r.pop("params")
        shard = r.pop("own_optimizer_shard_mb")
        print(f"dp{dp}_own_optimizer_shard_mb={shard:.1f}")
        for key, value in r.items():
            print(f"dp{dp}_{key}={value:.3f}")
        for fmt in args.formats:
            extra = r[f"{fmt}_sync_peak_extra_rss_mb"]
            print(f"dp{dp}_{fmt}_peak_extra_rss_over_own_optimizer_shard={extra / shard:.3f}")
            for prefix in ("first_", ""):
                blocked, sync = r[f"{fmt}_async_{prefix}blocked_s"], r[f"{fmt}_sync_{prefix}save_s"]
                print(f"dp{dp}_{fmt}_{prefix}async_blocked_over_sync_save={blocked / sync:.3f}")
                cow = r[f"{fmt}_async_{prefix}cow_s"]
                print(f"dp{dp}_{fmt}_{prefix}async_blocked_and_cow_over_sync_save="
                      f"{(blocked + cow) / sync:.3f}")


if __name__ == "__main__":
    main()
