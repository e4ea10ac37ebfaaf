"""Next-token statistics of one micro-batch from vocab-parallel logits.

For each loss-bearing position (``loss_mask`` > 0) of a micro-batch:

* **loss**: the cross entropy of the label over the real vocabulary (megatron's
  ``vocab_parallel_cross_entropy`` with the padded ids at ``-inf``, as training computes
  it: :mod:`phoenix.model.vocab_mask`), so an eval loss on training data equals
  ``1_train/loss`` and the exported HF model's loss.
* **top-k accuracy** (k = 1, 5): the label is among the k most likely *real* tokens.
  The output layer is padded beyond the model's vocabulary (``model.vocab_size``, or the
  tokenizer's size; see :func:`phoenix.model.builder.padded_vocab_size`); those padding
  ids can never be the right answer and are excluded from the ranking (they neither count
  as predictions nor push the label down).

The rank of the label is computed instead of a top-k list: ``rank = #{real ids v :
logit_v > logit_label}``, a hit at k when ``rank < k``. It is exact under tensor
parallelism with two all-reduces of one number per position (the label's logit, found
on the TP rank that owns that vocab slice; then the per-rank counts), whatever k, and
needs no gather of logits or of per-rank top-k lists. Ties count in the label's favour
(an id with exactly the label's logit does not rank above it); with float logits this
differs from ``torch.topk``'s arbitrary tie order only on exact ties.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TOPK = (1, 5)
STATS = ("loss_sum", "tokens", *(f"top{k}_hits" for k in TOPK))
"""Order of the entries of the stats vector (float64, summed over micro-batches/ranks)."""


def token_stats(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                vocab_size: int, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Summed statistics of one micro-batch: float64 ``[loss_sum, tokens, top1, top5]``.

    ``logits``: this TP rank's vocab slice ``[..., vocab_padded / tp]`` (the slices in
    TP-rank order make the padded vocab); ``labels``, ``loss_mask``: ``[...]`` (the same
    leading shape). ``vocab_size``: ids ``>= vocab_size`` are padding. ``tp_group``: the
    tensor-parallel group (``layout.tp_group``), over which this is collective; ``None``:
    the logits hold the whole vocabulary (one TP rank). The logits may be modified in place.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    logits = logits.float()
    labels = labels.to(logits.device).long()
    mask = loss_mask.to(logits.device).float() > 0
    part = logits.size(-1)
    start = tp_rank * part

    # The label's logit: taken on the TP rank whose slice holds it, summed over TP.
    owned = (labels >= start) & (labels < start + part)
    local = (labels - start).clamp(0, part - 1)
    label_logit = torch.gather(logits, -1, local.unsqueeze(-1)).squeeze(-1)
    label_logit = torch.where(owned, label_logit, torch.zeros_like(label_logit))
    if tp_size > 1:
        dist.all_reduce(label_logit, group=tp_group)
    # Real (non-padding) ids of this slice that rank strictly above the label.
    real = min(max(vocab_size - start, 0), part)
    above = (logits[..., :real] > label_logit.unsqueeze(-1)).sum(dim=-1)
    if tp_size > 1:
        dist.all_reduce(above, group=tp_group)

    # Last: megatron's cross entropy subtracts the max from fp32 logits in place. Padded
    # ids take no part in the softmax (the model's output hook already did this; again
    # here for logits from anywhere else).
    if real < part:
        logits[..., real:] = float("-inf")
    token_loss = vocab_parallel_cross_entropy(logits, labels)
    stats = [torch.where(mask, token_loss.double(), 0.0).sum(), mask.sum().double()]
    stats += [(mask & (above < k)).sum().double() for k in TOPK]
    return torch.stack(stats)
