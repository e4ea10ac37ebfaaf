"""Document boundaries inside packed samples: segment ids, restarted positions, EOD loss.

A packed sample holds the end of one document, whole documents and the start of another,
separated by the end-of-document (EOD) token. :class:`DocumentInputs` turns a collated
micro-batch into what document-aware training needs, the way Megatron-LM's
``--reset-attention-mask --reset-position-ids --eod-mask-loss`` do
(``_get_ltor_masks_and_position_ids`` in megatron-core's ``gpt_dataset.py``):

- ``segment_ids`` int32 [b, s]: the document of each position, counting from 0 in each
  sample. An EOD token belongs to the document it ends, so the next document starts
  right after it. The model side turns them into a block-diagonal causal mask
  (local spec) or packed THD sequences (Transformer Engine); see
  :mod:`phoenix.model.attention_inputs`.
- ``position_ids`` restart at 0 at every document start.
- with ``eod_mask_loss``, positions whose *input* token is EOD carry no loss (the
  prediction of the next document's first token from the previous document).

It runs on the loader's prefetch thread, on whole micro-batches, vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def segment_ids(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """int32 [b, s]: 0 for the first document of each row, +1 after every EOD token."""
    is_eod = (tokens == eod_id).to(torch.int32)
    # Position t belongs to the document of t-1 if t-1 is not an EOD: count EODs before t.
    return torch.cumsum(is_eod, dim=1, dtype=torch.int32) - is_eod


def restarted_positions(segments: torch.Tensor) -> torch.Tensor:
    """int64 [b, s]: the offset of each position from the start of its document."""
    b, s = segments.shape
    arange = torch.arange(s, dtype=torch.int64).expand(b, s)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start_of = torch.cummax(torch.where(starts, arange, torch.zeros_like(arange)), dim=1).values
    return arange - start_of


@dataclass(frozen=True)
class DocumentInputs:
    """Micro-batch transform for document-aware training (``data.document_mask``,
    ``data.eod_mask_loss``); identity when both are off."""

    eod_id: int
    document_mask: bool = False
    eod_mask_loss: bool = False

    @classmethod
    def from_config(cls, data_cfg, eod_id: int) -> "DocumentInputs | None":
        """The transform of a run's ``data`` section; None when it has nothing to do."""
        inputs = cls(eod_id, data_cfg.document_mask, data_cfg.eod_mask_loss)
        return inputs if inputs.active else None

    @property
    def active(self) -> bool:
        return self.document_mask or self.eod_mask_loss

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch``: ``tokens`` [b, s] and ``loss_mask`` [b, s] (and ``position_ids``);
        returns it with ``segment_ids`` added and ``position_ids`` / ``loss_mask``
        replaced as configured."""
        if not self.active:
            return batch
        tokens = batch["tokens"]
        if self.document_mask:
            segments = segment_ids(tokens, self.eod_id)
            batch["segment_ids"] = segments
            batch["position_ids"] = restarted_positions(segments)
        if self.eod_mask_loss:
            batch["loss_mask"] = batch["loss_mask"] * (tokens != self.eod_id).to(batch["loss_mask"].dtype)
        return batch
