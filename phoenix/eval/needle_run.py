"""The needle eval on a megatron model: greedy decoding, the collective evaluation and
the heatmap.

* :func:`greedy_generate_fn`: a ``generate_fn`` for :func:`phoenix.eval.needle.score`
  from megatron ``GPTModel`` chunks: greedy decoding by :class:`phoenix.eval.decoding.Decoder`
  (the decoder of ``phoenix generate``; a KV cache where it gives the same tokens as a
  full recompute). Under tensor parallelism every TP rank generates the same tokens.
  Pipeline and context parallelism are refused: a sequence that grows token by token
  does not fit megatron's fixed-shape pipeline schedule (evaluate such a checkpoint with
  ``phoenix eval ... parallel.pipeline=1``; it reshards).
* :class:`NeedleEvaluator`: the prompts of a run (built once per set of lengths),
  dealt round robin over the data-parallel ranks, scored, and the hit counts summed over
  the ``dp_group``: every rank gets the same :class:`~phoenix.eval.needle.NeedleResult`.
  Passive like :class:`~phoenix.eval.evaluator.Evaluator` (eval mode, no grad, RNG
  states restored).
* :func:`write_heatmap`: the accuracy matrix as a PNG (matplotlib, Agg backend, imported
  lazily; without matplotlib a warning is logged once and no PNG is written).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from phoenix.eval.needle import (
    NeedleResult,
    build_needle_tasks,
    default_lengths,
    haystack_tokens_needed,
    read_haystack,
    score,
)

log = logging.getLogger("phoenix.eval")


def check_needle_layout(layout) -> None:
    """Refuse layouts the token-by-token decoding cannot run on (ConfigError)."""
    from phoenix.eval.decoding import check_decoding_layout

    check_decoding_layout(layout, "eval.needle")


def greedy_generate_fn(model_chunks, layout, new_tokens: int, vocab_size: int):
    """A ``generate_fn``: prompts (token-id lists) -> ``new_tokens`` greedy ids each, by
    :class:`phoenix.eval.decoding.Decoder` (the decoder of ``phoenix generate``: KV cache
    where it gives the full recompute's tokens). Collective over the TP group."""
    from phoenix.eval.decoding import Decoder, SamplingParams

    check_needle_layout(layout)
    params = SamplingParams(max_new_tokens=new_tokens)
    decoder = []  # built at the first call: the evaluator is made before the model is used

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        if not decoder:
            decoder.append(Decoder(model_chunks, layout, vocab_size, what="eval.needle"))
        return decoder[0].generate(prompts, params)

    return generate


class NeedleEvaluator:
    """Runs the needle eval of ``cfg`` (a NeedleConfig) on ``model_chunks``; collective."""

    def __init__(self, model_chunks, layout, cfg, tokenizer, *, vocab_size: int,
                 micro_batch_size: int):
        check_needle_layout(layout)
        self.model = list(model_chunks)
        self.layout, self.cfg, self.tokenizer = layout, cfg, tokenizer
        self.micro_batch_size = micro_batch_size
        self.generate = greedy_generate_fn(self.model, layout, cfg.new_tokens, vocab_size)
        self._tasks: dict[tuple[int, ...], list] = {}

    def lengths(self, seq_length: int) -> list[int]:
        """The lengths evaluated while training at ``seq_length``."""
        return list(self.cfg.lengths or default_lengths(seq_length))

    def tasks(self, seq_length: int) -> list:
        lengths = tuple(self.lengths(seq_length))
        if lengths not in self._tasks:
            drop = [i for i in (self.tokenizer.eod_id, self.tokenizer.bos_id) if i is not None]
            hay = read_haystack(self.cfg.haystack_prefix, haystack_tokens_needed(lengths), drop)
            self._tasks[lengths] = build_needle_tasks(self.tokenizer, hay, self.cfg, seq_length)
        return self._tasks[lengths]

    def evaluate(self, seq_length: int) -> NeedleResult:
        """The accuracy matrix at the lengths for ``seq_length`` (the same on every rank)."""
        from phoenix.eval.evaluator import passive_eval

        tasks = self.tasks(seq_length)
        mine = tasks[self.layout.dp_rank::self.layout.dp_size]
        with passive_eval(self.model):
            result = score(mine, self.generate, self.tokenizer.decode,
                           batch_size=self.micro_batch_size, lengths=self.lengths(seq_length),
                           depths=self.cfg.depths)
        counts = torch.as_tensor(np.stack([result.hits, result.counts]), dtype=torch.int64,
                                 device=self.layout.device)
        dist.all_reduce(counts, group=self.layout.dp_group)
        result.hits, result.counts = (c.cpu().numpy() for c in counts)
        # Every prompt's answer on every rank, in the order of the tasks (for --out).
        gathered = [None] * self.layout.dp_size
        dist.all_gather_object(gathered, result.answers, group=self.layout.dp_group)
        result.answers = sorted((a for part in gathered for a in part),
                                key=lambda a: (a["length"], a["depth"], a["trial"]))
        return result

    def evaluate_timed(self, seq_length: int) -> tuple[NeedleResult, float]:
        t0 = time.perf_counter()
        result = self.evaluate(seq_length)
        return result, time.perf_counter() - t0


_warned_no_matplotlib = False


def heatmap_path(out_dir: str | Path, step: int | None) -> Path:
    """``<out_dir>/needle/step_XXXXXXX.png`` (``step_unknown.png`` without a step)."""
    name = f"step_{step:07d}.png" if step is not None else "step_unknown.png"
    return Path(out_dir) / "needle" / name


def write_heatmap(result: NeedleResult, path: str | Path, title: str = "") -> np.ndarray | None:
    """Write the depth x length accuracy heatmap to ``path`` (atomically) and return it as
    an RGB image ``uint8 [H, W, 3]`` (for TensorBoard); None, after a one-time warning,
    when matplotlib is not importable."""
    global _warned_no_matplotlib
    try:
        from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no GUI backend
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        if not _warned_no_matplotlib:
            log.warning("needle eval: matplotlib is not installed; no heatmap PNG is written "
                        "(the scalars are still logged)")
            _warned_no_matplotlib = True
        return None
    from phoenix.io import atomic_write

    matrix = result.matrix
    fig = Figure(figsize=(1.2 + 0.9 * len(result.lengths), 1.0 + 0.5 * len(result.depths)),
                 dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.nan_to_num(matrix, nan=0.0), vmin=0.0, vmax=1.0, cmap="RdYlGn",
                   aspect="auto")
    ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:g}" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"needle accuracy (mean {result.mean:.3f})", fontsize=9)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            text = "-" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return image
