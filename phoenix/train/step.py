"""One forward step of a GPT model and its token-summed loss, for megatron's schedules.

The loss function returns ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``;
with ``calculate_per_token_loss`` megatron-core divides the gradients by the global
token count, so losses and gradients are exact token means over the global batch at
every parallel layout.
"""

from __future__ import annotations

from functools import partial

import torch

from phoenix.model.attention_inputs import document_forward


# Per-sample provenance carried from the loader into the loss report (when present).
PROVENANCE = ("dataset_id", "sample_id", "group_id", "document_id")


def loss_func(loss_mask: torch.Tensor, provenance: dict, output_tensor: torch.Tensor):
    """``output_tensor``: per-token losses [b, s] from GPTModel; returns summed loss.

    Besides the total, the report carries each sample's (loss sum, tokens) and its
    provenance, so monitors can split the loss by dataset or trace a spike to its data.
    """
    token_losses = output_tensor.float()
    mask = loss_mask.float()
    per_sample = torch.stack([(token_losses * mask).sum(dim=1), mask.sum(dim=1)], dim=1).detach()
    loss_sum = torch.sum(token_losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()]),
              "per_sample": per_sample.double(), **provenance}
    return loss_sum, num_tokens, report


def forward_step(data_iterator, model, packed: bool = False, cp_group=None):
    """megatron ``forward_step_func``: next micro-batch through the model chunk.

    A micro-batch with ``segment_ids`` (``data.document_mask``) keeps its documents apart:
    a dense mask, or THD sequences when ``packed`` (Transformer Engine). ``cp_group``:
    with context parallelism (CUDA + TE only), this rank keeps its 2 of the 2*CP
    load-balanced sequence chunks (megatron-core's ``get_batch_on_this_cp_rank``); the
    loss and token counts are then partial sums, completed over the DP x CP group. Bind
    both with ``functools.partial``.
    """
    batch = next(data_iterator)
    device = next(model.parameters()).device
    if cp_group is not None:
        from megatron.core.utils import get_batch_on_this_cp_rank

        sliced = get_batch_on_this_cp_rank(
            {k: batch[k] for k in ("tokens", "labels", "position_ids", "loss_mask")}, cp_group)
        batch = {**batch, **sliced}
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    if "segment_ids" in batch:
        segments = batch["segment_ids"].to(device, non_blocking=True)
        output = document_forward(model, tokens, position_ids, segments, labels, packed)
    else:
        output = model(tokens, position_ids, attention_mask=None, labels=labels)
    provenance = {k: batch[k] for k in PROVENANCE if k in batch}
    return output, partial(loss_func, loss_mask, provenance)


def batch_report(losses_reduced: list[dict], cp_group=None) -> dict[str, torch.Tensor]:
    """This rank's micro-batch reports joined: ``per_sample`` [n, 2] (loss sum, tokens)
    and the provenance fields [n], in training order. Empty off the last stage.
    ``cp_group``: context parallelism; the per-sample sums are completed over it."""
    if not losses_reduced:
        return {}
    keys = ["per_sample", *[k for k in PROVENANCE if k in losses_reduced[0]]]
    report = {k: torch.cat([r[k].reshape(len(r["per_sample"]), -1).squeeze(1) if k != "per_sample"
                            else r[k] for r in losses_reduced]) for k in keys}
    if cp_group is not None:
        torch.distributed.all_reduce(report["per_sample"], group=cp_group)
    return report


def reduce_loss(losses_reduced: list[dict], dp_group) -> torch.Tensor:
    """Sum the micro-batch reports and all-reduce over ``dp_group``: a float64 tensor
    ``[loss sum, tokens]`` of the global batch on the model's device (no host copy; empty
    ``losses_reduced``, i.e. not the last pipeline stage, is a ValueError)."""
    if not losses_reduced:
        raise ValueError("reduce_loss: no micro-batch reports (not the last pipeline stage)")
    total = torch.stack([r["lm loss"] for r in losses_reduced]).sum(dim=0).double()
    torch.distributed.all_reduce(total, group=dp_group)
    return total
