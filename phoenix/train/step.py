"""One forward step of a GPT model and its token-summed loss, for megatron's schedules.

The loss function returns ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``;
with ``calculate_per_token_loss`` megatron-core divides the gradients by the global
token count, so losses and gradients are exact token means over the global batch at
every parallel layout.
"""

from __future__ import annotations

from functools import partial

import torch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """``output_tensor``: per-token losses [b, s] from GPTModel; returns summed loss."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """megatron ``forward_step_func``: next micro-batch through the model chunk."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    output = model(tokens, position_ids, attention_mask=None, labels=labels)
    return output, partial(loss_func, loss_mask)


def reduce_loss(losses_reduced: list[dict], dp_group) -> tuple[float, int]:
    """Sum the micro-batch reports and all-reduce over DP: (mean loss, tokens)."""
    if not losses_reduced:
        return float("nan"), 0
    total = torch.stack([r["lm loss"] for r in losses_reduced]).sum(dim=0)
    torch.distributed.all_reduce(total, group=dp_group)
    loss_sum, tokens = total.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)
