"""Datasets as Megatron-LM's own preprocessing writes them, for tests.

Built with megatron-core's ``IndexedDatasetBuilder`` the way Megatron-LM's
``tools/preprocess_data.py --split-sentences --append-eod`` drives it: one sequence per
sentence (``add_item``), ``end_document`` after each document, the EOD id after a
document's last sentence, and no ``.meta.json`` (phoenix wrote none of it). The returned
per-document token lists are the oracle: what the builder was given, not what phoenix
reads back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class SentenceSplitData:
    prefix: str
    documents: list[list[np.ndarray]]
    """Token ids of every document's sentences, in order (EOD ends the last one)."""
    groups: np.ndarray | None
    """int64 group id per document (``PREFIX.groups.npy``), or None."""

    @property
    def num_sequences(self) -> int:
        return sum(len(d) for d in self.documents)

    def document_of_token(self) -> np.ndarray:
        """int64 [num_tokens]: the document of every token of the ``.bin`` stream."""
        lengths = [sum(len(s) for s in d) for d in self.documents]
        return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def write_sentence_split(prefix: str | Path, jsonl: str | Path, tokenizer_model: str,
                         group_key: str | None = None, max_docs: int | None = None,
                         ) -> SentenceSplitData:
    """Tokenise ``jsonl`` sentence by sentence into ``prefix.bin/.idx``; with
    ``group_key``, also write ``prefix.groups.npy`` with one id per *document*."""
    import torch

    from phoenix.data.indexed import indexed_dataset_module
    from phoenix.tokenizer import SentencePieceTokenizer

    idx = indexed_dataset_module()
    tok = SentencePieceTokenizer(tokenizer_model)
    prefix = str(prefix)
    builder = idx.IndexedDatasetBuilder(prefix + ".bin",
                                        dtype=idx.DType.optimal_dtype(tok.vocab_size))
    documents, group_values = [], []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if max_docs is not None and len(documents) == max_docs:
                break
            record = json.loads(line)
            sentences = [s for s in SENTENCE_END.split(record["text"]) if s.strip()]
            ids = [np.asarray(tok.encode(s), dtype=np.int64) for s in sentences]
            ids[-1] = np.append(ids[-1], tok.eod_id)
            for sentence in ids:
                builder.add_item(torch.from_numpy(sentence))
            builder.end_document()
            documents.append(ids)
            if group_key is not None:
                group_values.append(record[group_key])
    builder.finalize(prefix + ".idx")
    groups = None
    if group_key is not None:
        first_seen = {v: i for i, v in enumerate(dict.fromkeys(group_values))}  # 0..G-1
        groups = np.asarray([first_seen[v] for v in group_values], dtype=np.int64)
        np.save(prefix + ".groups.npy", groups)
    return SentenceSplitData(prefix, documents, groups)
