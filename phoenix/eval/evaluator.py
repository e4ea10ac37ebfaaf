"""Held-out evaluation of a (TP/PP/DP-parallel) GPT model on fixed ``.bin/.idx`` sets.

Which samples: of each set, ``max_samples`` fixed-length samples (``seq_length`` tokens
plus the shifted label, cut from the token stream as training cuts it; see
:mod:`phoenix.data.samples`), spread evenly over the set: sample ``(i * n) // m`` for
``i < m``. They are the same at every evaluation and every layout.

How: the samples are dealt round robin over the data-parallel ranks (rank ``r`` takes
``r, r + dp, ...``) and cut into micro-batches, the last one padded with copies that
carry no loss. megatron's forward-only schedule runs them (so pipeline parallelism
works); on the last stage the loss function turns the vocab-parallel logits into
summed statistics (:func:`phoenix.eval.metrics.token_stats`, over the layout's
``tp_group``), which are summed over micro-batches and all-reduced over the layout's
``dp_group``, then broadcast to every rank. Sums
of per-token quantities make the result the same at every layout (up to float
rounding).

Passive: the model is put in eval mode (no dropout) and back, runs under ``no_grad``,
and the RNG states (torch, CUDA, megatron's tracker) are saved and restored, so
training after an evaluation is bit-identical to training without one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from phoenix.eval.metrics import STATS, token_stats
from phoenix.model.attention_inputs import document_forward
from phoenix.model.chunks import chunk_iterators

log = logging.getLogger("phoenix.eval")

_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class EvalResult:
    """Metrics of one eval set (token means over its loss-bearing tokens)."""

    name: str
    prefix: str
    samples: int
    tokens: int
    loss: float
    ppl: float
    top1: float
    top5: float

    def scalars(self) -> dict[str, float]:
        """The TensorBoard scalars: ``eval/<name>/<key>``."""
        return {"loss": self.loss, "ppl": self.ppl, "top1": self.top1, "top5": self.top5}

    def to_dict(self) -> dict:
        return asdict(self)


def select_samples(num_samples: int, max_samples: int) -> np.ndarray:
    """``max_samples`` sample ids spread evenly over ``[0, num_samples)`` (0: all)."""
    m = num_samples if max_samples <= 0 else min(max_samples, num_samples)
    return (np.arange(m, dtype=np.int64) * num_samples) // m


def format_table(results: dict[str, EvalResult]) -> str:
    width = max([len("set"), *map(len, results)])
    lines = [f"{'set':<{width}}  {'samples':>8} {'tokens':>10} {'loss':>9} {'ppl':>11} "
             f"{'top1':>7} {'top5':>7}"]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {r.samples:>8} {r.tokens:>10} {r.loss:>9.4f} "
                     f"{r.ppl:>11.3f} {r.top1:>7.4f} {r.top5:>7.4f}")
    return "\n".join(lines)


@contextlib.contextmanager
def passive_eval(model_chunks):
    """Eval mode, no grad, and every RNG stream as it was afterwards."""
    from megatron.core import tensor_parallel

    modes = [chunk.training for chunk in model_chunks]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    try:
        for chunk in model_chunks:
            chunk.eval()
        with torch.no_grad():
            yield
    finally:
        for chunk, mode in zip(model_chunks, modes):
            chunk.train(mode)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


class Evaluator:
    """Evaluates ``model_chunks`` (megatron DDP-wrapped or bare ``GPTModel``) on eval sets.

    Every rank of the world must call :meth:`evaluate` (it is collective); every rank
    gets the same results.
    """

    def __init__(self, model_chunks, layout, sets, *, seq_length: int, micro_batch_size: int,
                 max_samples: int, eod_id: int, vocab_size: int, documents=None,
                 packed: bool = False):
        """``layout``: the :class:`~phoenix.runtime.ParallelLayout` (ranks, groups, device).
        ``sets``: :class:`~phoenix.config.eval.EvalSetConfig` items; ``vocab_size``:
        the unpadded vocabulary (ids from it up to the padded size are never predicted).
        ``documents``: the training run's :class:`~phoenix.data.documents.DocumentInputs`
        (document mask, EOD loss mask), so eval sees samples as training does; ``packed``:
        THD sequences instead of the dense mask (Transformer Engine)."""
        from phoenix.data.samples import SampleReader, build_sample_index

        self.model = list(model_chunks)
        self.layout = layout
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.vocab_size = vocab_size
        self.documents, self.packed = documents, packed
        self.sets = []
        for s in sets:
            index = build_sample_index(s.prefix, seq_length, use_groups=False)
            reader = SampleReader(index, eod_id, vocab_size=vocab_size, name=s.display_name)
            self.sets.append((s.display_name, s.prefix, reader,
                              select_samples(len(index), max_samples)))

    @classmethod
    def from_run_config(cls, model_chunks, layout, cfg, eval_cfg, tokenizer,
                        seq_length: int | None = None) -> "Evaluator":
        """The evaluator of a run: its micro-batch size, vocab and document inputs;
        ``seq_length``: that of the stage being evaluated (default ``data.seq_length``)."""
        from phoenix.data.documents import DocumentInputs
        from phoenix.model.builder import uses_te_spec
        from phoenix.tokenizer import model_vocab_size

        return cls(model_chunks, layout, eval_cfg.sets, seq_length=seq_length or cfg.data.seq_length,
                   micro_batch_size=eval_cfg.micro_batch_size or cfg.train.micro_batch_size,
                   max_samples=eval_cfg.max_samples, eod_id=tokenizer.eod_id,
                   vocab_size=model_vocab_size(cfg, tokenizer),
                   documents=DocumentInputs.from_config(cfg.data, tokenizer.eod_id),
                   packed=uses_te_spec(layout))

    # -- batches ---------------------------------------------------------------------
    def _micro_batches(self, reader, sample_ids: np.ndarray) -> list[dict[str, torch.Tensor]]:
        mine = sample_ids[self.layout.dp_rank::self.layout.dp_size]
        samples = [reader.read(int(i)) for i in mine]
        if not samples:
            return []
        mbs = self.micro_batch_size
        # Padded with copies that carry no loss to whole micro-batches and, under a virtual
        # pipeline, to a multiple of the pipeline size of them (megatron-core 0.16.1's
        # interleaved schedule raises otherwise).
        multiple = mbs * (self.layout.pp_size if len(self.model) > 1 else 1)
        while len(samples) % multiple:
            filler = dict(samples[-1])
            filler["loss_mask"] = np.zeros_like(filler["loss_mask"])
            samples.append(filler)
        batches = [{k: torch.as_tensor(np.stack([s[k] for s in samples[j:j + mbs]])) for k in _FIELDS}
                   for j in range(0, len(samples), mbs)]
        return [self.documents(b) for b in batches] if self.documents else batches

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        tokens = batch["tokens"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        # Without labels the last stage returns the vocab-parallel logits [b, s, vocab/tp].
        if "segment_ids" in batch:
            segments = batch["segment_ids"].to(device, non_blocking=True)
            output = document_forward(model, tokens, position_ids, segments, packed=self.packed)
        else:
            output = model(tokens, position_ids, attention_mask=None)
        return output, partial(self._loss_func, batch["labels"], batch["loss_mask"])

    def _loss_func(self, labels, loss_mask, logits):
        stats = token_stats(logits, labels, loss_mask, self.vocab_size, self.layout.tp_group)
        return stats[0].float(), stats[1].to(torch.int), {"eval": stats}

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self) -> dict[str, EvalResult]:
        """Metrics of every set, by name (collective; the same on every rank)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward = get_forward_backward_func()
        results = {}
        with passive_eval(self.model):
            for name, prefix, reader, sample_ids in self.sets:
                batches = self._micro_batches(reader, sample_ids)
                total = torch.zeros(len(STATS), dtype=torch.float64)
                if batches:
                    reports = forward(
                        forward_step_func=self._forward_step,
                        data_iterator=chunk_iterators(batches, len(self.model)),
                        model=self.model, num_microbatches=len(batches),
                        seq_length=self.seq_length, micro_batch_size=self.micro_batch_size,
                        forward_only=True)
                    for report in reports or []:  # empty off the last stage
                        total += report["eval"].detach().double().cpu()
                device = self.layout.device
                total = total.to(device)
                if self.layout.is_last_stage:
                    dist.all_reduce(total, group=self.layout.dp_group)
                # The last global rank is on the last stage; it tells the other stages.
                dist.broadcast(total, src=self.layout.world_size - 1)
                loss_sum, tokens, top1, top5 = total.cpu().tolist()
                loss = loss_sum / tokens if tokens else float("nan")
                results[name] = EvalResult(
                    name=name, prefix=prefix, samples=len(sample_ids), tokens=int(tokens),
                    loss=loss, ppl=math.exp(loss) if loss < 700 else float("inf"),
                    top1=top1 / tokens if tokens else float("nan"),
                    top5=top5 / tokens if tokens else float("nan"))
        return results

    def evaluate_timed(self) -> tuple[dict[str, EvalResult], float]:
        t0 = time.perf_counter()
        results = self.evaluate()
        return results, time.perf_counter() - t0
