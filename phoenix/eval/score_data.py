"""Per-document scores of an indexed dataset under a checkpoint: mean token loss,
perplexity and Min-K% probability, at any TP/PP/DP layout.

Each document (its sequences concatenated, trailing EOD included as stored) is scored on
its own, as if it started a sample: token ``t`` (``1 <= t < n``) is predicted from
tokens ``< t`` of the same document; the first token has no prediction, so a document
of ``n`` tokens has ``n - 1`` scored tokens (none for ``n = 1``: NaN scores).

Windows (documents longer than the model's context): window ``j`` feeds tokens
``[j * stride, j * stride + S)`` (``S`` = ``seq_length``, position ids from 0) and scores
the tokens it predicts that no earlier window scored, i.e. up to ``min(j * stride + S,
n - 1)``. Every token is scored exactly once; past the first window each sees at least
``S - stride`` tokens of context (``stride = S``: disjoint windows, cheapest).

Per document (natural log, per token):

* ``loss``: the mean cross entropy of its scored tokens over the real vocabulary (the
  padded ids excluded, as :mod:`phoenix.eval.metrics` computes it);
* ``ppl``: ``exp(loss)``;
* ``min_k``: Min-K% probability (Shi et al., "Detecting Pretraining Data from Large
  Language Models", arXiv 2310.16789): the mean log-probability of the ``max(1,
  floor(k/100 * m))`` least likely of its ``m`` scored tokens (``<= 0``; their code
  reports its negation);
* ``tokens``: ``m``.

How: documents are dealt round robin over the data-parallel ranks (rank ``r`` takes
``r, r + dp, ...``); their windows, padded to ``S`` with the EOD id (padding carries no
loss; attention is causal, so it cannot change earlier positions), run through megatron's
forward-only schedule in micro-batches (pipeline parallelism works); the last stage turns
the vocab-parallel logits into per-token losses (over the layout's ``tp_group``). Each
DP replica's last-stage TP-rank-0 process sends its documents' scores to rank 0
(an object collective).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from phoenix.eval.evaluator import passive_eval

SCORES = ("loss", "ppl", "min_k", "tokens")


@dataclass(frozen=True)
class ScoreSettings:
    """``seq_length``: tokens per window (<= the model's ``max_seq_length``); ``stride``:
    tokens between window starts (1..seq_length); ``micro_batch_size``: windows per
    forward; ``min_k``: percent of least likely tokens for Min-K% (0 < k <= 100)."""

    seq_length: int
    stride: int
    micro_batch_size: int = 4
    min_k: float = 20.0

    def problems(self) -> list[str]:
        out = []
        if self.seq_length < 1:
            out.append(f"--seq-length {self.seq_length}: must be >= 1")
        if not 1 <= self.stride <= self.seq_length:
            out.append(f"--stride {self.stride}: must be in [1, seq_length {self.seq_length}]")
        if self.micro_batch_size < 1:
            out.append(f"--micro-batch-size {self.micro_batch_size}: must be >= 1")
        if not 0 < self.min_k <= 100:
            out.append(f"--min-k {self.min_k}: must be in (0, 100]")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, length, first)`` per window of a document of ``n`` tokens: inputs
    ``tokens[start:start+length]``, labels shifted by one; output positions
    ``first .. length-1`` are the window's scored tokens (see the module docstring)."""
    out, scored, start = [], 0, 0  # scored: the last token index predicted so far
    while scored < n - 1:
        end = min(start + seq_length, n - 1)  # the last token this window predicts
        if end > scored:
            out.append((start, end - start, scored - start))
            scored = end
        start += stride
    return out


def min_k_logprob(token_loss: np.ndarray, k: float) -> float:
    """Mean log-probability of the ``max(1, floor(k% of m))`` least likely tokens."""
    if len(token_loss) == 0:
        return float("nan")
    count = max(1, int(len(token_loss) * k / 100.0))
    return float(-np.sort(token_loss)[::-1][:count].mean())


def token_losses(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """Per-token cross entropy ``[b, s]`` (float32, nats) of this TP rank's vocab slice
    ``logits [b, s, vocab_padded / tp]``; ids ``>= vocab_size`` (padding) take no part."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    logits = logits.float()
    part = logits.size(-1)
    real = min(max(vocab_size - tp_rank * part, 0), part)
    if real < part:
        logits[..., real:] = float("-inf")
    return vocab_parallel_cross_entropy(logits, labels.to(logits.device).long())


class DocumentReader:
    """Documents of an indexed prefix as int64 token arrays (sequences concatenated)."""

    def __init__(self, prefix: str):
        from phoenix.data.indexed import indexed_dataset_module

        self.prefix = prefix
        self.ds = indexed_dataset_module().IndexedDataset(prefix, mmap=True)
        self.docs = np.asarray(self.ds.document_indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.docs) - 1

    def __getitem__(self, d: int) -> np.ndarray:
        seqs = [self.ds[int(s)] for s in range(self.docs[d], self.docs[d + 1])]
        return np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64)

    def max_token(self) -> int:
        """The largest token id stored (one pass over the ``.bin``)."""
        data = np.memmap(self.prefix + ".bin", dtype=self.ds.index.dtype, mode="r")
        return int(data.max()) if len(data) else -1


class DocumentScorer:
    """Scores documents with ``model_chunks`` (bare GPTModel chunks) at ``layout``;
    every rank of the world calls :meth:`score` (collective)."""

    def __init__(self, model_chunks, layout, vocab_size: int, pad_id: int, settings: ScoreSettings):
        self.model, self.layout = list(model_chunks), layout
        self.vocab_size, self.pad_id, self.settings = vocab_size, pad_id, settings

    def _batches(self, reader, doc_ids):
        """(micro-batches, per row ``(doc, first, length)`` or None for a filler row)."""
        S, mbs = self.settings.seq_length, self.settings.micro_batch_size
        rows, meta = [], []
        for d in doc_ids:
            tokens = reader[d]
            for start, length, first in windows(len(tokens), S, self.settings.stride):
                row = np.full(S + 1, self.pad_id, dtype=np.int64)
                row[:length + 1] = tokens[start:start + length + 1]
                mask = np.zeros(S, dtype=np.float32)
                mask[first:length] = 1.0
                rows.append((row, mask))
                meta.append((d, first, length))
        while len(rows) % mbs:  # a filler row: no loss, not read back
            rows.append((rows[-1][0], np.zeros(S, dtype=np.float32)))
            meta.append(None)
        batches = []
        for j in range(0, len(rows), mbs):
            tok = torch.as_tensor(np.stack([r for r, _ in rows[j:j + mbs]]))
            batches.append({"tokens": tok[:, :-1], "labels": tok[:, 1:],
                            "loss_mask": torch.as_tensor(np.stack([m for _, m in rows[j:j + mbs]])),
                            "position_ids": torch.arange(S).expand(tok.size(0), S)})
        return batches, meta

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        output = model(batch["tokens"].to(device), batch["position_ids"].to(device),
                       attention_mask=None)  # causal; the last stage returns the logits
        return output, partial(self._loss_func, batch["labels"], batch["loss_mask"])

    def _loss_func(self, labels, loss_mask, logits):
        losses = token_losses(logits, labels, self.vocab_size, self.layout.tp_group)
        mask = loss_mask.to(losses.device)
        return (losses * mask).sum(), mask.sum().clamp(min=1).to(torch.int), {"token_loss": losses}

    def score(self, reader: DocumentReader, progress: bool = False,
              docs_per_chunk: int = 64) -> dict[str, np.ndarray] | None:
        """Arrays :data:`SCORES` (one entry per document of ``reader``) on global rank 0,
        None elsewhere."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from tqdm import tqdm

        layout, S = self.layout, self.settings.seq_length
        mine = list(range(layout.dp_rank, len(reader), layout.dp_size))
        chunks = [mine[i:i + docs_per_chunk] for i in range(0, len(mine), docs_per_chunk)]
        keeps = layout.is_last_stage and layout.tp_rank == 0
        ids, loss_sums, counts, min_k = [], [], [], []
        forward = get_forward_backward_func()
        with passive_eval(self.model):
            for chunk in tqdm(chunks, desc="score documents", unit="chunk",
                              disable=not (progress and layout.rank == 0)):
                batches, meta = self._batches(reader, chunk)
                reports = forward(forward_step_func=self._forward_step, data_iterator=iter(batches),
                                  model=self.model, num_microbatches=len(batches), seq_length=S,
                                  micro_batch_size=self.settings.micro_batch_size, forward_only=True)
                if not keeps:
                    continue
                rows = [r for report in reports for r in report["token_loss"].float().cpu().numpy()]
                per_doc: dict[int, list[np.ndarray]] = {d: [] for d in chunk}
                for row, m in zip(rows, meta):
                    if m is not None:
                        per_doc[m[0]].append(row[m[1]:m[2]])
                for d, parts in per_doc.items():
                    tl = np.concatenate(parts) if parts else np.zeros(0, np.float32)
                    ids.append(d)
                    loss_sums.append(float(tl.astype(np.float64).sum()))
                    counts.append(len(tl))
                    min_k.append(min_k_logprob(tl, self.settings.min_k))
        mine_out = (np.asarray(ids, np.int64), np.asarray(loss_sums), np.asarray(counts, np.int64),
                    np.asarray(min_k)) if keeps else None
        gathered = [None] * layout.world_size if layout.rank == 0 else None
        dist.gather_object(mine_out, gathered, dst=0)
        if layout.rank != 0:
            return None
        n = len(reader)
        out = {"loss_sum": np.zeros(n), "tokens": np.zeros(n, np.int64), "min_k": np.full(n, np.nan)}
        for part in gathered:
            if part is not None:
                d, ls, c, mk = part
                out["loss_sum"][d], out["tokens"][d], out["min_k"][d] = ls, c, mk
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(out["tokens"] > 0, out["loss_sum"] / np.maximum(out["tokens"], 1), np.nan)
        return {"loss": loss, "ppl": np.exp(np.minimum(loss, 700.0)), "min_k": out["min_k"],
                "tokens": out["tokens"]}


def keep_mask(loss: np.ndarray, tokens: np.ndarray, fraction: float,
              groups: np.ndarray | None = None) -> np.ndarray:
    """Which documents to keep: the best ``ceil(fraction * N)`` documents by ``loss``
    (lowest first), or with ``groups`` (a group id per document) whole groups, ranked by
    their token-weighted mean loss (the group's token losses summed over its scored
    tokens), taken best first until at least ``ceil(fraction * N)`` documents are kept.
    Documents / groups without a scored token are always kept. Ties: lower id first."""
    n = len(loss)
    units = groups if groups is not None else np.arange(n)
    uniq, inverse = np.unique(units, return_inverse=True)
    sums = np.bincount(inverse, weights=np.nan_to_num(loss) * tokens, minlength=len(uniq))
    counts = np.bincount(inverse, weights=tokens, minlength=len(uniq))
    docs = np.bincount(inverse, minlength=len(uniq))
    unit_loss = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
    order = np.argsort(unit_loss, kind="stable")
    target = math.ceil(fraction * n - 1e-9)
    taken = np.cumsum(docs[order])
    last = int(np.searchsorted(taken, target))  # first position reaching the target
    kept_units = np.zeros(len(uniq), dtype=bool)
    kept_units[order[:last + 1]] = True
    return kept_units[inverse]
