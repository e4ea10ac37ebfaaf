"""``phoenix describe``: size, FLOPs and memory per GPU of a recipe, before any hardware.

    phoenix describe CONFIG.yaml [key=value ...] [--world-size N] [--vocab-size V] [--json]

Prints total and active parameters (MoE: the routed experts a token is not sent to are
not active), the training FLOPs per token (forward + backward, the convention of
``throughput/tflops_per_gpu``), and the memory of the most loaded GPU for the recipe's
layout at ``--world-size`` GPUs (default ``$WORLD_SIZE``, else the smallest world the
layout needs): weights, gradients, optimizer states with and without the distributed
optimizer, activations per micro-batch and in flight, logits. The counts and formulas
are in :mod:`phoenix.model.size`. The sequence length and batch are those of the
recipe's longest stage. The vocabulary is ``model.vocab_size``, else ``--vocab-size``,
else the tokenizer's (when its file exists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from phoenix.config import ConfigError, load_config

GIB = 1024 ** 3


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def describe(cfg, world_size: int, vocab_size: int) -> dict:
    """The numbers ``phoenix describe`` prints, as a JSON-ready dict."""
    from phoenix.model.builder import padded_vocab_size
    from phoenix.model.size import Layout, memory_estimate, parameter_count
    from phoenix.monitor.throughput import model_flops_per_token

    cfg.validate_layout(world_size)
    p, m = cfg.parallel, cfg.model
    dp = cfg.data_parallel_size(world_size)
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, p.tensor)
    stage = max(cfg.resolved.stages.stages, key=lambda s: (s.seq_length, s.global_batch_size))
    count = parameter_count(m, padded)
    flash = cfg.runtime.device == "cuda"  # the Transformer Engine spec's fused attention
    layout = Layout(
        tensor=p.tensor, pipeline=p.pipeline, data=dp * p.context,
        expert=getattr(p, "expert", 1), expert_tensor=getattr(p, "expert_tensor", None),
        sequence_parallel=p.sequence_parallel, distributed_optimizer=p.use_distributed_optimizer,
        precision=cfg.train.precision, micro_batch_size=cfg.train.micro_batch_size,
        num_micro_batches=stage.global_batch_size // (cfg.train.micro_batch_size * dp),
        seq_length=stage.seq_length // p.context, flash_attention=flash)
    mem = memory_estimate(m, padded, layout)
    return {
        "parameters": {"total": count.total, "active": count.active, "embedding": count.embedding,
                       "output": count.output, "routed_experts": count.experts},
        "vocab": {"size": vocab_size, "padded": padded},
        "flops_per_token": model_flops_per_token(m, stage.seq_length, padded),
        "layout": {"world_size": world_size, "tensor": p.tensor, "pipeline": p.pipeline,
                   "context": p.context, "data": dp, "expert": layout.expert,
                   "micro_batch_size": layout.micro_batch_size,
                   "micro_batches": layout.num_micro_batches, "seq_length": stage.seq_length,
                   "stage": stage.name, "precision": layout.precision,
                   "flash_attention": flash},
        "memory_bytes": {"weights": mem.weights, "gradients": mem.gradients,
                         "optimizer": mem.optimizer,
                         "optimizer_not_distributed": mem.optimizer_not_distributed,
                         "activations": mem.activations,
                         "activations_per_micro_batch": mem.activations_per_micro_batch,
                         "logits": mem.logits, "total": mem.total, "params_on_gpu": mem.params},
    }


def format_description(d: dict) -> str:
    par, lay, mem = d["parameters"], d["layout"], d["memory_bytes"]
    gib = {k: v / GIB for k, v in mem.items()}
    lines = [
        f"parameters: total {_fmt_count(par['total'])} | active per token "
        f"{_fmt_count(par['active'])} | embedding {_fmt_count(par['embedding'])} | output "
        f"{_fmt_count(par['output'])}" + (f" | routed experts {_fmt_count(par['routed_experts'])}"
                                          if par["routed_experts"] else ""),
        f"vocab: {d['vocab']['size']} -> {d['vocab']['padded']} padded",
        f"FLOPs per token (train, fwd+bwd, seq {lay['seq_length']}): "
        f"{d['flops_per_token']:.3e}",
        f"layout: {lay['world_size']} GPUs = TP {lay['tensor']} x PP {lay['pipeline']} x CP "
        f"{lay['context']} x DP {lay['data']} (EP {lay['expert']}); micro-batch "
        f"{lay['micro_batch_size']} x {lay['micro_batches']} per step; stage '{lay['stage']}'; "
        f"{lay['precision']}; {'flash' if lay['flash_attention'] else 'unfused'} attention",
        "memory of the most loaded GPU (GiB, estimate; + CUDA context and fragmentation):",
        f"  weights      {gib['weights']:9.2f}   ({_fmt_count(mem['params_on_gpu'])} parameters)",
        f"  gradients    {gib['gradients']:9.2f}   (fp32 buffer)",
        f"  optimizer    {gib['optimizer']:9.2f}   (Adam; {gib['optimizer_not_distributed']:.2f} "
        f"without the distributed optimizer)",
        f"  activations  {gib['activations']:9.2f}   ({gib['activations_per_micro_batch']:.2f} "
        f"per micro-batch, no recomputation)",
        f"  logits       {gib['logits']:9.2f}",
        f"  total        {gib['total']:9.2f}",
    ]
    return "\n".join(lines)


def _vocab_size(cfg, given: int | None) -> int:
    if cfg.model.vocab_size or given:
        return cfg.model.vocab_size or given
    if os.path.isfile(cfg.tokenizer.model):
        from phoenix.tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(cfg.tokenizer.model).vocab_size
    raise ConfigError(f"model.vocab_size: not set and tokenizer.model {cfg.tokenizer.model} "
                      f"does not exist; give model.vocab_size=N or --vocab-size N")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phoenix describe", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=8")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs of the run (default $WORLD_SIZE, else TP x PP x CP)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary when model.vocab_size is not set")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        p = cfg.parallel
        world = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or (
            p.tensor * p.pipeline * p.context)
        d = describe(cfg, world, _vocab_size(cfg, args.vocab_size))
    except (ConfigError, OSError) as e:
        print(f"phoenix describe: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0
