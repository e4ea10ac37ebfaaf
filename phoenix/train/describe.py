"""What a recipe needs before it runs: parameters, FLOPs per token and the memory of the
most loaded GPU of its layout (``phoenix describe``, and ``phoenix train --dry-run``).
The counts and formulas are in :mod:`phoenix.model.size`; the FLOPs convention is that of
``3_throughput/tflops_per_gpu`` (:func:`phoenix.monitor.throughput.model_flops_per_token`).
"""

from __future__ import annotations

import os

from phoenix.config import ConfigError

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
    from phoenix.runtime.capabilities import resolved_attention_backend, te_available

    cfg.validate_layout(world_size)
    p, m = cfg.parallel, cfg.model
    dp = cfg.data_parallel_size(world_size)
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, p.tensor)
    stage = max(cfg.resolved.stages.stages, key=lambda s: (s.seq_length, s.global_batch_size))
    count = parameter_count(m, padded)
    # The core attention this run would use here (auto resolved against this machine's
    # packages), and whether the document mask is the local spec's dense one (the TE spec
    # packs documents into THD sequences instead).
    attention = resolved_attention_backend(cfg)
    te_spec = attention == "te" or cfg.runtime.device == "cuda" and te_available()
    dense_mask = cfg.data.document_mask and not te_spec
    layout = Layout(
        tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.chunks, data=dp * p.context,
        expert=getattr(p, "expert", 1), expert_tensor=getattr(p, "expert_tensor", None),
        sequence_parallel=p.sequence_parallel, distributed_optimizer=p.use_distributed_optimizer,
        precision=cfg.train.precision, micro_batch_size=cfg.train.micro_batch_size,
        num_micro_batches=stage.global_batch_size // (cfg.train.micro_batch_size * dp),
        seq_length=stage.seq_length // p.context, attention=attention, dense_mask=dense_mask,
        recompute=m.recompute.granularity, recompute_method=m.recompute.method or "uniform",
        recompute_num_layers=m.recompute.num_layers or 1,
        recompute_modules=tuple(m.recompute.modules or ("core_attn",)))
    mem = memory_estimate(m, padded, layout)
    return {
        "parameters": {"total": count.total, "active": count.active, "embedding": count.embedding,
                       "output": count.output, "routed_experts": count.experts},
        "vocab": {"size": vocab_size, "padded": padded},
        "flops_per_token": model_flops_per_token(m, stage.seq_length, padded),
        "layout": {"world_size": world_size, "tensor": p.tensor, "pipeline": p.pipeline,
                   "virtual_pipeline": p.chunks,
                   "pipeline_layers": pipeline_layers(m.num_layers, p.pipeline, p.chunks),
                   "context": p.context, "data": dp, "expert": layout.expert,
                   "micro_batch_size": layout.micro_batch_size,
                   "micro_batches": layout.num_micro_batches, "seq_length": stage.seq_length,
                   "stage": stage.name, "precision": layout.precision,
                   "attention": attention, "attention_backend": m.attention_backend,
                   "dense_document_mask": dense_mask,
                   "recompute": _recompute_label(m.recompute)},
        "memory_bytes": {"weights": mem.weights, "gradients": mem.gradients,
                         "optimizer": mem.optimizer,
                         "optimizer_not_distributed": mem.optimizer_not_distributed,
                         "activations": mem.activations,
                         "activations_per_micro_batch": mem.activations_per_micro_batch,
                         "logits": mem.logits, "total": mem.total, "params_on_gpu": mem.params},
    }


def pipeline_layers(num_layers: int, pp: int, vp: int) -> list[list[list[int]]]:
    """Global 0-based layers of each pipeline rank's model chunks: ``[rank][chunk]`` ->
    layers (one chunk per rank without a virtual pipeline)."""
    from phoenix.model.builder import chunk_layers

    return [[list(chunk_layers(num_layers, pp, vp, r, c)) for c in range(vp)] for r in range(pp)]


def _fmt_layers(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _pipeline_line(lay: dict) -> list[str]:
    """``pipeline: rank 0 layers 0-3 | ...``; with a virtual pipeline each rank's chunks."""
    ranks = lay.get("pipeline_layers") or []
    if len(ranks) < 2:
        return []
    vp = lay.get("virtual_pipeline", 1)
    head = (f"pipeline: {len(ranks)} stages x {vp} chunks (interleaved 1F1B), global layers"
            if vp > 1 else f"pipeline: {len(ranks)} stages, global layers")
    parts = [f"rank {r}: " + ", ".join(_fmt_layers(c) for c in chunks)
             for r, chunks in enumerate(ranks)]
    if len(parts) > 8:  # a long pipeline: its first and last ranks tell the pattern
        parts = parts[:4] + ["..."] + parts[-2:]
    return [head + " " + " | ".join(parts)]


def _recompute_label(rc) -> str:
    """``model.recompute`` in words, for the activations line."""
    if rc.granularity == "none":
        return "no recomputation"
    if rc.granularity == "full":
        return f"full recompute {rc.method} {rc.num_layers}"
    return f"selective recompute {','.join(rc.modules or ['core_attn'])}"


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:8.2f} MiB"


def format_description(d: dict) -> str:
    par, lay, mem = d["parameters"], d["layout"], d["memory_bytes"]
    gib = {k: _fmt_bytes(v) for k, v in mem.items()}
    lines = [
        f"parameters: total {_fmt_count(par['total'])} | active per token "
        f"{_fmt_count(par['active'])} | embedding {_fmt_count(par['embedding'])} | output "
        f"{_fmt_count(par['output'])}" + (f" | routed experts {_fmt_count(par['routed_experts'])}"
                                          if par["routed_experts"] else ""),
        f"vocab: {d['vocab']['size']} -> {d['vocab']['padded']} padded",
        f"FLOPs per token (train, fwd+bwd, seq {lay['seq_length']}; attention over the full "
        f"s x s, whatever the kernel): {d['flops_per_token']:.3e}",
        f"layout: {lay['world_size']} GPUs = TP {lay['tensor']} x PP {lay['pipeline']}"
        + (f" (VP {lay['virtual_pipeline']})" if lay.get("virtual_pipeline", 1) > 1 else "")
        + f" x CP "
        f"{lay['context']} x DP {lay['data']} (EP {lay['expert']}); micro-batch "
        f"{lay['micro_batch_size']} x {lay['micro_batches']} per step; stage '{lay['stage']}'; "
        f"{lay['precision']}; attention {lay['attention']}" + _auto_note(lay)
        + ("; dense document mask" if lay["dense_document_mask"] else ""),
        *_pipeline_line(lay),
        "memory of the most loaded GPU (estimate; + CUDA context and fragmentation):",
        f"  weights      {gib['weights']}   ({_fmt_count(mem['params_on_gpu'])} parameters)",
        f"  gradients    {gib['gradients']}   (fp32 buffer)",
        f"  optimizer    {gib['optimizer']}   (Adam; {gib['optimizer_not_distributed'].strip()} "
        f"without the distributed optimizer)",
        f"  activations  {gib['activations']}   ({gib['activations_per_micro_batch'].strip()} "
        f"per micro-batch, {lay.get('recompute', 'no recomputation')}"
        + ("; s x s softmax per head" if lay["attention"] == "unfused"
           and "selective" not in lay.get("recompute", "") or "core_attn" not in
           lay.get("recompute", "core_attn") else "") + ")",
        f"  logits       {gib['logits']}",
        f"  total        {gib['total']}",
    ]
    return "\n".join(lines)


def _auto_note(lay: dict) -> str:
    """Why ``model.attention_backend: auto`` chose what it chose on this machine."""
    if lay["attention_backend"] != "auto":
        return ""
    why = {"te": "Transformer Engine here", "sdpa": "CUDA, no Transformer Engine here",
           "unfused": "cpu"}[lay["attention"]]
    return f" (auto: {why})"


def vocab_size_of(cfg, given: int | None = None) -> int | None:
    """``model.vocab_size``, else ``given``, else the tokenizer's when its file exists."""
    from phoenix.tokenizer import model_vocab_size

    if cfg.model.vocab_size is None and given:
        return given
    if cfg.model.vocab_size is not None or os.path.exists(cfg.tokenizer.path):
        return model_vocab_size(cfg)
    return None


def require_vocab_size(cfg, given: int | None = None) -> int:
    vocab = vocab_size_of(cfg, given)
    if vocab is None:
        raise ConfigError(f"model.vocab_size: not set and the tokenizer {cfg.tokenizer.path} "
                          f"does not exist; give model.vocab_size=N or --vocab-size N")
    return vocab


def fit_verdict(make_config, world_size: int, vocab_size: int, gpu_gib: float) -> dict:
    """Whether the run fits ``gpu_gib`` GiB per GPU (the estimate's total, which leaves out
    the CUDA context and fragmentation), and if not the smallest change that fits, tried in
    this order: activation recompute (selective, then full), a larger tensor-parallel size,
    a larger pipeline-parallel size (each alone at the same world size), then each of those
    with full recompute. ``make_config(overrides)`` builds the run's config with extra
    dotted overrides (a ConfigError skips a candidate)."""
    cfg = make_config([])
    budget = gpu_gib * GIB
    total = describe(cfg, world_size, vocab_size)["memory_bytes"]["total"]
    out = {"gpu_gib": gpu_gib, "total": total, "fits": total <= budget, "change": None,
           "change_total": None}
    if out["fits"]:
        return out
    p = cfg.parallel
    recompute = [["model.recompute.granularity=selective"], ["model.recompute.granularity=full"]]
    tp = [[f"parallel.tensor={p.tensor * 2 ** k}"] for k in (1, 2, 3)]
    pp = [[f"parallel.pipeline={p.pipeline * 2 ** k}"] for k in (1, 2, 3)]
    candidates = recompute + tp + pp + [c + recompute[1] for c in tp + pp]
    if cfg.model.recompute.granularity != "none":  # already on: only the layouts are news
        candidates = tp + pp + [c + recompute[1] for c in tp + pp]
    for extra in candidates:
        try:
            total = describe(make_config(extra), world_size, vocab_size)["memory_bytes"]["total"]
        except ConfigError:
            continue
        if total <= budget:
            out.update(change=extra, change_total=total)
            break
    return out


def format_fit(v: dict) -> str:
    head = (f"fit in {v['gpu_gib']:g} GiB per GPU: {'yes' if v['fits'] else 'no'} "
            f"(estimate {v['total'] / GIB:.2f} GiB; + CUDA context and fragmentation)")
    if v["fits"]:
        return head
    if v["change"] is None:
        return head + "; no single change of recompute, TP or PP at this world size fits"
    return (head + f"; smallest change that fits: {' '.join(v['change'])} "
            f"({v['change_total'] / GIB:.2f} GiB)")
