#!/usr/bin/env python
"""Phoenix's training step on one CUDA GPU against a bare megatron-core loop.

Both sides train the same megatron-core GPTModel (built from the same config, bf16,
megatron's DDP and Adam, per-token loss) for the same number of steps:

* **phoenix**: ``Trainer`` as ``phoenix train`` runs it: the data plan, the loader's
  background prefetch, document inputs, the loss report, the throughput / norm monitors
  and every other default callback, at ``logging.norm_interval`` 0, 10 and 1.
* **megatron_core**: megatron-core's ``get_forward_backward_func`` on batches of random
  tokens that are already on the GPU, then ``optimizer.step()``: no data loading and no
  monitoring, the floor Phoenix's loop can reach.

Each run is a fresh process (megatron-core keeps its groups in module globals). Prints
``name=value`` lines: median step time, tokens/s and model FLOPs utilisation (peak from
``phoenix.monitor.throughput``) of each, ``phoenix_vs_megatron_core`` (step time ratio,
1.0 = no overhead), ``norm_overhead_interval_{1,10}`` and the peak memory::

    python benchmarks/bench_gpu_step.py --preset 400m --seq-length 2048 \
        --global-batch-size 32 --micro-batch-size 8 --steps 15

Needs a CUDA GPU (refuses otherwise). Transformer Engine is used when importable (the
``te`` spec), else megatron-core's local spec; the spec is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARMUP = 3


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0


def _config(args, data, out_dir: str, norm_interval: int):
    from phoenix.config import build_config
    from phoenix.testing.tiny import tiny_config_dict

    d = tiny_config_dict(
        data, out_dir, runtime={"device": args.device},
        model={"preset": args.preset, "vocab_size": args.vocab_size},
        data={**tiny_config_dict(data, out_dir)["data"], "seq_length": args.seq_length,
              "prefetch_batches": 2},
        train={"steps": args.steps + WARMUP, "global_batch_size": args.global_batch_size,
               "micro_batch_size": args.micro_batch_size, "seed": 1234,
               "precision": args.precision},
        logging={"log_interval": 1, "tensorboard": False, "norm_interval": norm_interval})
    return build_config(d)


def phoenix_worker(args, data, out_dir: str, norm_interval: int) -> dict:
    from phoenix.runtime import init_runtime
    from phoenix.testing.workers import StepTimer
    from phoenix.train.trainer import Trainer

    cfg = _config(args, data, out_dir, norm_interval)
    trainer = Trainer(cfg, init_runtime(cfg))
    timer = StepTimer()
    trainer.callbacks.append(timer)
    trainer.setup()
    _reset_peak()
    trainer.train()
    from phoenix.model.builder import uses_te_spec

    return {"times": timer.times[WARMUP:], "losses": [s["loss"] for s in timer.steps],
            "peak_gb": _peak_gb(),
            "spec": "te" if uses_te_spec(trainer.layout) else "local"}


def megatron_core_worker(args, data, out_dir: str) -> dict:
    """The same model and optimizer in a loop of megatron-core calls and nothing else."""
    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from phoenix.model.builder import build_model
    from phoenix.optim.builder import build_optimizer
    from phoenix.runtime import init_runtime

    cfg = _config(args, data, out_dir, 0)
    layout = init_runtime(cfg)
    model = build_model(cfg, layout, args.vocab_size)
    optimizer = build_optimizer(cfg, model, layout)
    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model[0].no_sync
    mbs, seq = args.micro_batch_size, args.seq_length
    n_micro = args.global_batch_size // mbs
    dev = layout.device
    gen = torch.Generator(device=dev).manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (mbs, seq + 1), device=dev, generator=gen)
               for _ in range(n_micro)]
    position_ids = torch.arange(seq, device=dev).unsqueeze(0).expand(mbs, seq)
    loss_mask = torch.ones(mbs, seq, device=dev)

    def loss_func(output_tensor):
        loss = (output_tensor.float() * loss_mask).sum()
        n = loss_mask.sum().to(torch.int)
        return loss, n, {"lm loss": torch.stack([loss.detach(), n.float()])}

    def forward_step(it, chunk):
        b = next(it)
        return chunk(b[:, :-1], position_ids, None, labels=b[:, 1:]), loss_func

    fb = get_forward_backward_func()
    times, losses = [], []
    _reset_peak()
    for _ in range(args.steps + WARMUP):
        _sync()
        t0 = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = fb(forward_step_func=forward_step, data_iterator=iter(batches), model=model,
                 num_microbatches=n_micro, seq_length=seq, micro_batch_size=mbs,
                 forward_only=False)
        optimizer.step()
        s = torch.stack([o["lm loss"] for o in out]).sum(0)
        losses.append(float(s[0] / s[1]))  # also synchronises
        _sync()
        times.append(time.perf_counter() - t0)
    return {"times": times[WARMUP:], "losses": losses,
            "peak_gb": _peak_gb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="400m")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--global-batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=15, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--norm-intervals", default="0,10,1",
                    help="phoenix runs, by logging.norm_interval")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_step: no CUDA GPU is visible (this benchmark measures the GPU path)")
    from phoenix.monitor.throughput import default_peak_tflops, model_flops_per_token
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.tiny import make_tiny_data

    backend = "nccl" if args.device == "cuda" else "gloo"
    intervals = [int(x) for x in args.norm_intervals.split(",") if x != ""]
    with tempfile.TemporaryDirectory() as tmp:
        data = make_tiny_data(Path(tmp) / "data")
        (mc,) = run_distributed(megatron_core_worker, 1, args, data, f"{tmp}/mc", backend=backend)
        res = {}
        for k in intervals:
            (res[k],) = run_distributed(phoenix_worker, 1, args, data, f"{tmp}/ph{k}", k,
                                        backend=backend)
        cfg = _config(args, data, f"{tmp}/x", 0)
    flops_token = model_flops_per_token(cfg.model, args.seq_length, args.vocab_size)
    name = torch.cuda.get_device_name() if args.device == "cuda" else None
    peak = default_peak_tflops(name, args.precision)
    tokens = args.global_batch_size * args.seq_length
    print(f"device={name}")
    print(f"preset={args.preset}")
    print(f"seq_length={args.seq_length}")
    print(f"global_batch_size={args.global_batch_size}")
    print(f"micro_batch_size={args.micro_batch_size}")
    print(f"precision={args.precision}")
    if res:
        print(f"spec={next(iter(res.values()))['spec']}")
    print(f"steps_timed={len(mc['times'])}")

    def report(label: str, r: dict) -> float:
        t = statistics.median(r["times"])
        print(f"{label}_step_ms={t * 1000:.1f}")
        print(f"{label}_tokens_per_s={tokens / t:.0f}")
        if peak:
            print(f"{label}_mfu={flops_token * tokens / t / (peak * 1e12):.4f}")
        print(f"{label}_peak_memory_gb={r['peak_gb']:.2f}")
        print(f"{label}_losses_finite={all(x == x and abs(x) != float('inf') for x in r['losses'])}")
        return t

    base = report("megatron_core", mc)
    for k, r in res.items():
        t = report(f"phoenix_norm_interval_{k}", r)
        print(f"phoenix_norm_interval_{k}_vs_megatron_core={t / base:.4f}")
    if 0 in res:
        t0 = statistics.median(res[0]["times"])
        for k in (x for x in res if x):
            print(f"norm_overhead_interval_{k}={statistics.median(res[k]['times']) / t0 - 1:.4f}")
        print(f"phoenix_first_loss={res[0]['losses'][0]:.4f}")
        print(f"phoenix_last_loss={res[0]['losses'][-1]:.4f}")
        if len(res) > 1:
            print(f"phoenix_losses_identical_across_norm_intervals="
                  f"{all(r['losses'] == res[0]['losses'] for r in res.values())}")


if __name__ == "__main__":
    main()
