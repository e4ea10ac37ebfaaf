"""Training samples from megatron-core's own ``GPTDataset`` / ``BlendedDataset``.

This is the sample source used until phoenix's group-aware data plan replaces the
blending; it is only reached through :class:`phoenix.data.loader.SampleSource`, so the
swap stays local to this module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from phoenix.data.indexed import DataError, check_prefix

log = logging.getLogger(__name__)


@dataclass
class _TokenizerInfo:
    """The two tokenizer facts megatron's GPTDataset needs (it takes a tokenizer object)."""

    vocab_size: int
    eod: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:
        # Part of megatron's dataset cache key: a different tokenizer gets other indices.
        return {"class": "phoenix-sentencepiece", "vocab_size": self.vocab_size, "eod": self.eod}


class MegatronBlendSource:
    """``sample(i)`` of a megatron-core blend of ``.bin/.idx`` prefixes.

    ``vocab_size``: the tokenizer's (part of megatron's cache key). ``check_vocab_size``:
    when given, a sample holding a token id outside ``[0, check_vocab_size)`` raises
    DataError naming the dataset and sample.
    """

    def __init__(self, prefixes: list[str], weights: list[float], names: list[str],
                 seq_length: int, num_samples: int, seed: int, vocab_size: int, eod_id: int,
                 cache_dir: str, check_vocab_size: int | None = None):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        for prefix in prefixes:
            check_prefix(prefix)
        os.makedirs(cache_dir, exist_ok=True)
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=(list(prefixes), list(weights)),
            split="100,0,0",
            path_to_cache=cache_dir,
            tokenizer=_TokenizerInfo(vocab_size=vocab_size, eod=eod_id),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        train, _, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
        self.dataset = train
        self.names = list(names)
        self.prefixes = list(prefixes)
        self.check_vocab_size = check_vocab_size
        self.num_samples = num_samples
        # A single prefix comes back as a bare GPTDataset; a blend carries its indices.
        self._dataset_index = getattr(train, "dataset_index", None)
        self._dataset_sample_index = getattr(train, "dataset_sample_index", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> dict:
        item = self.dataset[index]
        if self._dataset_index is not None:
            dataset_id = int(self._dataset_index[index])
            sample_id = int(self._dataset_sample_index[index])
        else:
            dataset_id, sample_id = 0, index
        if self.check_vocab_size is not None:
            self._check_ids(index, dataset_id, sample_id, item["tokens"], item["labels"])
        return {
            "tokens": item["tokens"].numpy(),
            "labels": item["labels"].numpy(),
            "loss_mask": item["loss_mask"].numpy().astype(np.float32),
            "position_ids": item["position_ids"].numpy(),
            "dataset_id": dataset_id,
            "sample_id": sample_id,
        }

    def provenance(self, index: int) -> dict:
        """``dataset_id`` and ``sample_id`` of blend position ``index`` (no token read)."""
        if self._dataset_index is None:
            return {"dataset_id": 0, "sample_id": int(index)}
        return {"dataset_id": int(self._dataset_index[index]),
                "sample_id": int(self._dataset_sample_index[index])}

    def _check_ids(self, index: int, dataset_id: int, sample_id: int, tokens, labels) -> None:
        ids = np.append(tokens.numpy(), labels.numpy()[-1:])
        if ids.max() < self.check_vocab_size and ids.min() >= 0:
            return
        bad = int(ids[np.flatnonzero((ids >= self.check_vocab_size) | (ids < 0))[0]])
        raise DataError(
            f"dataset '{self.names[dataset_id]}' ({self.prefixes[dataset_id]}): sample {sample_id} "
            f"(blend position {index}) holds token id {bad}, outside the vocabulary "
            f"[0, {self.check_vocab_size}); was it tokenised with another tokenizer?")
