"""Document-aware attention inputs for megatron-core's ``GPTModel``.

Two ways to keep the documents of a packed sample apart, one per layer spec:

- **local spec** (CPU, or CUDA without Transformer Engine): a dense bool mask
  ``[b, 1, s, s]``, True = masked, that is causal *and* block-diagonal. megatron-core's
  unfused softmax does not add the causal mask when a mask is given, so causality must
  be in it. It costs O(s^2) memory per micro-batch (as the attention scores do on this
  path), which is why ``data.dense_mask_max_seq_length`` bounds it.
- **Transformer Engine** (CUDA): packed THD sequences, ``PackedSeqParams`` with
  ``cu_seqlens``. TE ignores a dense mask under the causal mask type, so the dense mask
  must never be used there. The micro-batch's rows are concatenated into one THD
  sequence; every row boundary is also a document boundary. This path runs only on GPU
  and is not exercised by the CPU test suite.
"""

from __future__ import annotations

import torch


def dense_document_mask(segments: torch.Tensor) -> torch.Tensor:
    """bool [b, 1, s, s], True where attention is *not* allowed: a later position, or
    another document. ``segments``: int [b, s] document ids (non-decreasing per row)."""
    s = segments.shape[1]
    same_document = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril_()
    return ~(same_document & causal)[:, None]


def thd_packed_seq_params(segments: torch.Tensor):
    """``PackedSeqParams`` (qkv_format ``thd``) for the micro-batch's rows concatenated
    into one sequence of ``b * s`` tokens: one cumulative boundary per document.

    ``segments``: int [b, s]. The caller reshapes tokens / positions / labels to
    ``[1, b * s]`` and the per-token losses back to ``[b, s]``.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    flat_starts = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    cu_seqlens = torch.cat([flat_starts, torch.tensor([b * s], device=segments.device)]).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def document_forward(model, tokens, position_ids, segments, labels=None, packed: bool = False):
    """Run ``model`` (a GPTModel chunk) with documents kept apart.

    ``packed``: THD sequences (Transformer Engine layer spec) instead of the dense mask.
    Returns what the model returns, shaped as for ``[b, s]`` inputs.
    """
    if not packed:
        from phoenix.model.rope import document_rope  # dynamic NTK: each document's own base
        with document_rope(model, position_ids, segments):
            return model(tokens, position_ids, attention_mask=dense_document_mask(segments),
                         labels=labels)
    from phoenix.model.rope import current_rope
    rope = current_rope(model)
    if rope is not None and rope.scaling == "dynamic_ntk":
        raise ValueError("model.rope.scaling dynamic_ntk with data.document_mask: packed THD "
                         "sequences share one RoPE base, each document needs its own; use "
                         "the dense mask (no Transformer Engine) or another rope scaling")
    b, s = tokens.shape
    flat = (lambda t: None if t is None else t.reshape(1, b * s))
    output = model(flat(tokens), flat(position_ids), attention_mask=None, labels=flat(labels),
                   packed_seq_params=thd_packed_seq_params(segments))
    # Per-token losses [1, b*s] (labels given) or logits [1, b*s, v] on the last stage;
    # the hidden states between pipeline stages keep the THD layout.
    if labels is not None and output.dim() == 2:
        return output.reshape(b, s)
    if labels is None and output.dim() == 3 and output.shape[0] == 1:
        return output.reshape(b, s, -1)
    return output
