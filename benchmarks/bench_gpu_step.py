#!/usr/bin/env python
"""Phoenix's training step against a bare megatron-core loop, split into phases.

Every variant trains the same megatron-core GPTModel (same config and seed, megatron's
DDP and Adam, per-token loss) for ``--warmup`` + ``--steps`` steps, each in a fresh
process (megatron-core keeps its groups in module globals):

* ``megatron_core``: ``get_forward_backward_func`` + ``optimizer.step()`` on random
  batches already on the device: no data path, no monitoring; the floor.
* ``phoenix``: ``Trainer`` as ``phoenix train`` runs it: the data plan, the loader's
  background prefetch, the loss report and the default callbacks *with monitors on*
  (TensorBoard event files in a temporary directory, so NormMonitor, DatasetLossMonitor
  and ThroughputMonitor run), all at ``--log-interval`` (default 1: every monitor every
  step, the upper bound), ``logging.sync_timers`` on.
* ``megatron_core_loader``: the bare loop fed by phoenix's ``GlobalBatchLoader`` over the
  same data plan: ``megatron_core_loader_vs_megatron_core`` is the data path,
  ``phoenix_vs_megatron_core_loader`` the trainer loop and its callbacks.
* ``phoenix_norm_interval_K`` (``--norm-intervals``): ``phoenix`` again at
  ``logging.norm_interval`` K (0: no NormMonitor).
* ``megatron_core_B``, ``phoenix_B`` (``--attention-backend A,B,...``): the variants run
  with ``model.attention_backend`` A (the first: their names carry no suffix); each further
  backend B reruns ``megatron_core`` and ``phoenix`` with it (the data path does not
  depend on attention), e.g. ``--attention-backend unfused,sdpa`` for the local spec's
  unfused attention against torch's SDPA (flash / memory-efficient kernels).

Phase times are device-synchronised at the same boundaries in every variant (the
trainer's ``logging.sync_timers``): ``data`` (waiting for the loader), ``forward_backward``
(zeroing grads, the schedule and the global loss; the host-to-device copies of a
micro-batch happen in its forward step), ``optimizer`` (step, scheduler and the
``on_after_optimizer_step`` hooks), ``callbacks`` (the previous step's ``on_step_end`` and
sinks: the trainer charges them to the next step) and ``other`` (the rest of the step:
the non-finite check and the ``on_before_optimizer_step`` hooks). Each is a median over
the timed steps; ``step_ms`` is the median step time including the callbacks.

Prints one ``name=value`` per line, each variant's as soon as it has run (so a timeout
keeps what finished): ``callbacks`` (the callback list), ``step_ms``, ``tokens_per_s``,
``mfu`` (when the peak is known: ``--peak-tflops`` or the GPU's name), ``peak_memory_gib``
(``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS), the phase medians
``data_ms``, ``forward_backward_ms``, ``optimizer_ms``, ``callbacks_ms``, ``other_ms``,
``attention`` (the backend it resolved to: te, sdpa or unfused) and the step-time ratios
``phoenix_vs_megatron_core`` (1.0 = no overhead), ``megatron_core_loader_vs_megatron_core``
and ``phoenix_vs_megatron_core_loader`` (per backend, suffixed ``_B``), and
``<v>_B_vs_<v>`` (backend B's step time over the first backend's)::

    python benchmarks/bench_gpu_step.py                    # CUDA: 1.5b, seq 4096, 1 x 8, bf16
    python benchmarks/bench_gpu_step.py --device cpu --steps 4   # CPU: tiny, fp32 (a smoke run)
    python benchmarks/bench_gpu_step.py --attention-backend unfused,sdpa   # CUDA, without TE

The data is the tiny synthetic corpus (``phoenix.testing.tiny``); only its token ids
differ from real data, the shapes and the work do not. Transformer Engine is used when
importable (``spec=te``), else megatron-core's local spec (``spec=local``); the core
attention is ``--attention-backend`` (default auto: te with TE, else sdpa on CUDA,
unfused on CPU).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("data", "forward_backward", "optimizer", "callbacks", "other")
VARIANTS = ("megatron_core", "phoenix", "megatron_core_loader")
# Per device: preset, seq length, global batch, micro-batch, precision, vocabulary.
# CUDA: 1.5b at 4096 fits one 80 GB GPU with micro-batch 1 and no recomputation (local
# spec: the unfused attention keeps an fp32 softmax output and its bf16 copy, 1.6 GiB per
# layer, ~60 GiB in all with the weights and Adam); micro-batch 2 would not.
DEFAULTS = {"cuda": dict(preset="1.5b", seq_length=4096, global_batch_size=8,
                         micro_batch_size=1, precision="bf16", vocab_size=32000),
            "cpu": dict(preset="tiny", seq_length=64, global_batch_size=8,
                        micro_batch_size=2, precision="fp32", vocab_size=512)}


# -- measuring -----------------------------------------------------------------------
def _clock(device: str) -> float:
    """perf_counter after the device has finished the queued work (as sync_timers)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _padded_vocab(model) -> int:
    chunk = model[0]
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return int(chunk.vocab_size)


def _phase_callback():
    """A Callback keeping each step's phase times and loss from the trainer's StepMetrics."""
    from phoenix.monitor.base import Callback

    class PhaseTimes(Callback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_step_end(self, trainer, m) -> None:
            phases = {"data": m.data_time, "forward_backward": m.forward_backward_time,
                      "optimizer": m.optimizer_time, "callbacks": m.callbacks_time_prev_step}
            step = m.step_time + phases["callbacks"]
            phases["other"] = step - sum(phases.values())
            self.steps.append({"step": step, "loss": m.loss, "skipped": m.skipped, **phases})

    return PhaseTimes()


# -- the runs (each in its own process) -----------------------------------------------
def _config(args, data, out_dir: str, monitored: bool, norm_interval: int | None = None,
            attention: str = "auto"):
    from phoenix.config import build_config
    from phoenix.testing.tiny import tiny_config_dict

    base = tiny_config_dict(data, out_dir)
    return build_config(tiny_config_dict(
        data, out_dir, runtime={"device": args.device},
        model={"preset": args.preset, "vocab_size": args.vocab_size,
               "max_seq_length": args.seq_length, "attention_backend": attention},
        data={**base["data"], "seq_length": args.seq_length, "prefetch_batches": 2},
        train={"steps": args.warmup + args.steps, "global_batch_size": args.global_batch_size,
               "micro_batch_size": args.micro_batch_size, "seed": 1234,
               "precision": args.precision, "on_nonfinite_loss": "skip"},
        optim={"warmup_steps": 0, "decay_style": "constant", "lr": None},  # preset's LR
        logging={"log_interval": args.log_interval, "tensorboard": monitored,
                 "sync_timers": True,
                 "norm_interval": args.log_interval if norm_interval is None else norm_interval}))


def phoenix_worker(args, data, out_dir: str, norm_interval: int | None, attention: str) -> dict:
    from phoenix.model.builder import uses_te_spec
    from phoenix.runtime import init_runtime
    from phoenix.runtime.capabilities import resolved_attention_backend
    from phoenix.train.trainer import Trainer

    cfg = _config(args, data, out_dir, monitored=True, norm_interval=norm_interval,
                  attention=attention)
    trainer = Trainer(cfg, init_runtime(cfg))
    phases = _phase_callback()
    trainer.callbacks.append(phases)
    trainer.setup()
    _reset_peak(args.device)
    trainer.train()
    events = list(Path(out_dir, "tensorboard").rglob("events.out.tfevents*"))
    return {"steps": phases.steps, "peak_gib": _peak_memory_gib(args.device),
            "callbacks": [type(cb).__name__ for cb in trainer.callbacks if cb is not phases],
            "tensorboard_event_files": len(events), "vocab": _padded_vocab(trainer.model),
            "spec": "te" if uses_te_spec(trainer.layout) else "local",
            "attention": resolved_attention_backend(cfg)}


def _loss_func(loss_mask, output_tensor):
    import torch

    loss = (output_tensor.float() * loss_mask).sum()
    n = loss_mask.sum().to(torch.int)
    return loss, n, {"lm loss": torch.stack([loss.detach(), n.float()])}


def _forward_step(data_iterator, model):
    """The smallest forward step: move the micro-batch to the model's device, run it."""
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    tokens, labels, position_ids, loss_mask = (
        batch[k].to(dev, non_blocking=True)
        for k in ("tokens", "labels", "position_ids", "loss_mask"))
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, loss_mask.float())


def megatron_core_worker(args, data, out_dir: str, with_loader: bool, attention: str) -> dict:
    """The same model, optimizer and LR scheduler in a loop of megatron-core calls and
    nothing else, on random device batches or (``with_loader``) on phoenix's
    GlobalBatchLoader."""
    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from phoenix.model.builder import build_model, uses_te_spec
    from phoenix.optim.builder import build_optimizer, build_scheduler
    from phoenix.runtime import init_runtime
    from phoenix.runtime.capabilities import resolved_attention_backend

    cfg = _config(args, data, out_dir, monitored=False, attention=attention)
    layout = init_runtime(cfg)
    mbs, seq, dev = args.micro_batch_size, args.seq_length, layout.device
    n_micro = args.global_batch_size // (mbs * layout.dp_size)
    if with_loader:  # as Trainer.setup builds it (data plan before the model)
        from phoenix.data.documents import DocumentInputs
        from phoenix.data.loader import GlobalBatchLoader
        from phoenix.data.plan_cache import build_source
        from phoenix.train.trainer import check_inputs

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer = check_inputs(cfg)
        source, _ = build_source(cfg, layout.rank, tokenizer)
        loader = GlobalBatchLoader(source, cfg.resolved.stages, mbs, layout.dp_rank,
                                   layout.dp_size, cfg.train.steps,
                                   prefetch=cfg.data.prefetch_batches,
                                   transform=DocumentInputs.from_config(cfg.data, tokenizer.eod_id))
        next_batch = loader.next_batch
    model = build_model(cfg, layout, args.vocab_size)
    optimizer = build_optimizer(cfg, model, layout)
    # The LR / weight-decay scheduler, as Megatron-LM's train_step steps it: it sets each
    # param group's weight decay (none on norms and biases), so without it the loop
    # would train a different model.
    scheduler = build_scheduler(cfg, optimizer)
    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model[0].no_sync
    if not with_loader:
        gen = torch.Generator(device=dev).manual_seed(0)
        tokens = [torch.randint(0, args.vocab_size, (mbs, seq + 1), device=dev, generator=gen)
                  for _ in range(n_micro)]
        position_ids = torch.arange(seq, device=dev).unsqueeze(0).expand(mbs, seq)
        ones = torch.ones(mbs, seq, device=dev)
        batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": position_ids,
                    "loss_mask": ones} for t in tokens]
        next_batch = lambda: batches  # noqa: E731

    fb = get_forward_backward_func()
    steps = []
    _reset_peak(args.device)
    try:
        for _ in range(cfg.train.steps):
            t0 = _clock(args.device)
            micro_batches = next_batch()
            t_data = _clock(args.device)
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            out = fb(forward_step_func=_forward_step, data_iterator=iter(micro_batches),
                     model=model, num_microbatches=len(micro_batches), seq_length=seq,
                     micro_batch_size=mbs, forward_only=False)
            s = torch.stack([o["lm loss"] for o in out]).sum(0)
            loss = float(s[0] / s[1])  # the global loss, as the trainer's (also synchronises)
            t_fb = _clock(args.device)
            optimizer.step()
            scheduler.step(increment=1)
            t_end = _clock(args.device)
            steps.append({"step": t_end - t0, "loss": loss, "skipped": False,
                          "data": t_data - t0, "forward_backward": t_fb - t_data,
                          "optimizer": t_end - t_fb, "callbacks": 0.0, "other": 0.0})
    finally:
        if with_loader:
            loader.close()
    return {"steps": steps, "peak_gib": _peak_memory_gib(args.device), "callbacks": [],
            "vocab": _padded_vocab(model), "attention": resolved_attention_backend(cfg),
            "spec": "te" if uses_te_spec(layout) else "local"}


# -- the report ------------------------------------------------------------------------
def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    print(f"{name}={value}", flush=True)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def report(v: str, r: dict, args, flops_per_token: float, peak_tflops: float | None) -> float:
    """Print variant ``v``'s lines; returns its median step time (s)."""
    timed = r["steps"][args.warmup:]
    step = statistics.median(s["step"] for s in timed)
    tokens = args.global_batch_size * args.seq_length
    emit(f"{v}_attention", r["attention"])
    emit(f"{v}_callbacks", ",".join(r["callbacks"]) or "none")
    emit(f"{v}_step_ms", step * 1000)
    emit(f"{v}_tokens_per_s", tokens / step)
    if peak_tflops:
        emit(f"{v}_mfu", flops_per_token * tokens / step / (peak_tflops * 1e12))
    emit(f"{v}_peak_memory_gib", r["peak_gib"])
    for phase in PHASES:
        emit(f"{v}_{phase}_ms", statistics.median(s[phase] for s in timed) * 1000)
    losses = [s["loss"] for s in r["steps"]]
    emit(f"{v}_first_loss", losses[0])
    emit(f"{v}_last_loss", losses[-1])
    emit(f"{v}_losses_finite", all(x == x and abs(x) != float("inf") for x in losses))
    emit(f"{v}_skipped_steps", sum(s["skipped"] for s in r["steps"]))
    if "tensorboard_event_files" in r:
        emit(f"{v}_tensorboard_event_files", r["tensorboard_event_files"])
    return step


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--preset", help="model preset (configs/model; cuda: 1.5b, cpu: tiny)")
    ap.add_argument("--seq-length", type=int, help="tokens per sample (cuda: 4096, cpu: 64)")
    ap.add_argument("--global-batch-size", type=int, help="samples per step (cuda and cpu: 8)")
    ap.add_argument("--micro-batch-size", type=int, help="samples per micro-batch (cuda: 1, cpu: 2)")
    ap.add_argument("--vocab-size", type=int, help="model vocabulary (cuda: 32000, cpu: 512)")
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                    help="cuda: bf16; cpu: fp32 (the only CPU precision)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--log-interval", type=int, default=1,
                    help="phoenix's logging.log_interval and so every monitor's interval")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, run in this order (of {', '.join(VARIANTS)})")
    ap.add_argument("--norm-intervals", default="",
                    help="extra phoenix runs at these logging.norm_interval values")
    ap.add_argument("--attention-backend", default="auto",
                    help="model.attention_backend values, comma-separated (auto, te, sdpa, "
                         "unfused): the first for every variant, each further one reruns "
                         "megatron_core and phoenix")
    ap.add_argument("--peak-tflops", type=float,
                    help="per-device peak for mfu (default: from the GPU's name; none on CPU)")
    args = ap.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    args.norm_intervals = [int(k) for k in args.norm_intervals.split(",") if k != ""]
    args.attention_backend = [b for b in args.attention_backend.split(",") if b]
    bad = set(args.attention_backend) - {"auto", "te", "sdpa", "unfused"}
    if bad or not args.attention_backend or len(set(args.attention_backend)) < len(
            args.attention_backend):
        ap.error("--attention-backend: distinct values of auto, te, sdpa, unfused")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_step: no CUDA GPU is visible (use --device cpu for a smoke run)")
    from phoenix.monitor.throughput import default_peak_tflops, model_flops_per_token
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.tiny import make_tiny_data

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or default_peak_tflops(
        name if args.device == "cuda" else None, args.precision)
    header = {"device": name, "torch": torch.__version__,
              "megatron_core": _version("megatron-core"),
              "transformer_engine": _version("transformer-engine"),
              **{k: getattr(args, k) for k in ("preset", "seq_length", "global_batch_size",
                                               "micro_batch_size", "precision")},
              "steps_timed": args.steps, "warmup_steps": args.warmup,
              "log_interval": args.log_interval, "peak_tflops": peak or "unknown",
              "attention_backends": ",".join(args.attention_backend),
              "memory_measure": ("torch.cuda.max_memory_allocated" if args.device == "cuda"
                                 else "ru_maxrss")}
    for key, value in header.items():
        emit(key, value)
    # (name, variant, attention backend, norm interval), variant by variant so a timeout
    # keeps each variant's backends side by side.
    first, *others = args.attention_backend
    runs = [(v, v, first, None) for v in args.variants]
    for v in args.variants:
        if v in ("megatron_core", "phoenix"):
            at = runs.index((v, v, first, None)) + 1
            runs[at:at] = [(f"{v}_{b}", v, b, None) for b in others]
    runs += [(f"phoenix_norm_interval_{k}", "phoenix", first, k) for k in args.norm_intervals]
    backend = "nccl" if args.device == "cuda" else "gloo"
    times: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    flops_per_token = None
    with tempfile.TemporaryDirectory(prefix="bench_gpu_step-") as tmp:
        data = make_tiny_data(Path(tmp) / "data")
        model_cfg = _config(args, data, f"{tmp}/cfg", monitored=False).model
        for v, variant, attention, norm_interval in runs:
            out = f"{tmp}/{v}"
            try:
                if variant == "phoenix":
                    (r,) = run_distributed(phoenix_worker, 1, args, data, out, norm_interval,
                                           attention, backend=backend)
                else:
                    (r,) = run_distributed(megatron_core_worker, 1, args, data, out,
                                           variant == "megatron_core_loader", attention,
                                           backend=backend)
            except RuntimeError as e:  # one failed variant must not lose the others
                lines = [x for x in str(e).splitlines() if x.strip()]
                emit(f"{v}_error", lines[-1] if lines else "failed")
                print(e, file=sys.stderr, flush=True)
                continue
            if flops_per_token is None:
                flops_per_token = model_flops_per_token(model_cfg, args.seq_length, r["vocab"])
                emit("flops_per_token", f"{flops_per_token:.4g}")
            if "spec" not in header:  # the layer spec, and the first backend's attention
                header["spec"] = r["spec"]
                emit("spec", r["spec"])
                emit("attention", r["attention"])
            times[v] = report(v, r, args, flops_per_token, peak)
            sfx = "" if attention == first or norm_interval is not None else f"_{attention}"
            for a, b in (("phoenix", "megatron_core"), ("megatron_core_loader", "megatron_core"),
                         ("phoenix", "megatron_core_loader")):
                a, b = a + sfx, b + sfx
                if v in (a, b) and a in times and b in times:
                    emit(f"{a}_vs_{b}", times[a] / times[b])
            if sfx and variant in times:  # this backend's step time over the first one's
                emit(f"{v}_vs_{variant}", times[v] / times[variant])
            losses[v] = [s["loss"] for s in r["steps"]]
            if v in ("phoenix", "megatron_core_loader") and len(losses.keys() & {
                    "phoenix", "megatron_core_loader"}) == 2:
                # Same weights, data and LR: the trainer must train as the bare loop does.
                diff = max(abs(a - b) / abs(b) for a, b in zip(losses["phoenix"],
                                                               losses["megatron_core_loader"]))
                emit("phoenix_loss_max_rel_diff_vs_loader", f"{diff:.2e}")
            if norm_interval is not None:
                for base in ("phoenix", "megatron_core"):
                    if base in times:
                        emit(f"{v}_vs_{base}", times[v] / times[base])


if __name__ == "__main__":
    main()
