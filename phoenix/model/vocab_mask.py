"""The padded vocabulary columns of the output layer take no part in any softmax.

``build_model`` pads the vocabulary (:func:`phoenix.model.builder.padded_vocab_size`); the
padded rows of the output layer would give logits (0 after an import or ``expand-vocab``,
anything after training) that enter the cross entropy's denominator, in training and in
eval, while the exported HF model has no such columns. :func:`mask_padded_vocab` puts a
forward hook on the ``GPTModel``'s ``output_layer`` that sets the logits of ids
``>= vocab_size`` to ``-inf`` before anything reads them: megatron's loss (fused or not,
computed inside ``GPTModel.forward``), eval's loss and top-k, and decoding all range over
the real vocabulary, at every TP size. The output layer is vocab-parallel: TP rank r holds
ids ``[r·p, (r+1)·p)`` of the padded vocabulary (p = padded / tp), so the padding sits at
the end of the last ranks' slices; a gathered output (the whole padded row) is masked
from id ``vocab_size`` on. The gradient there is zero (softmax 0, and ``masked_fill``
passes no gradient to a filled position), so the padded rows never train.
"""

from __future__ import annotations

import torch


def padded_columns(width: int, padded: int, vocab_size: int, tp_rank: int) -> int:
    """Index within a logits row of ``width`` columns where the padding begins (``width``:
    none): the row is this TP rank's slice, or the whole padded vocabulary if gathered."""
    start = 0 if width == padded else tp_rank * width
    return min(max(vocab_size - start, 0), width)


def mask_padded_vocab(model, vocab_size: int, padded: int, tp_rank: int) -> None:
    """Hook ``model.output_layer`` (a GPTModel's; none on non-last pipeline stages) so the
    logits of padded ids are ``-inf``. A no-op when nothing is padded."""
    layer = getattr(model, "output_layer", None)
    if layer is None or padded <= vocab_size:
        return

    def hook(_module, _inputs, output):
        logits, bias = output if isinstance(output, tuple) else (output, None)
        real = padded_columns(logits.shape[-1], padded, vocab_size, tp_rank)
        if real == logits.shape[-1]:
            return output
        pad = torch.arange(logits.shape[-1], device=logits.device) >= real
        logits = logits.masked_fill(pad, float("-inf"))
        return (logits, bias) if isinstance(output, tuple) else logits

    layer.register_forward_hook(hook)
    model.phoenix_vocab_size = vocab_size
