"""Write a subset of an indexed prefix's documents as a new prefix, atomically.

The documents kept keep their order, their sequences (document boundaries included) and
token dtype; ``P.groups.npy`` (when the source has one) is renumbered ``0..G'-1`` in order,
and ``P.meta.json`` is the source's with the counts updated and a ``subset`` record. As
``phoenix preprocess`` does, every file is written as ``.P.tmp-*`` beside the output and
renamed into place only when all are complete, ``.meta.json`` last.
"""

from __future__ import annotations

import os
import uuid

import numpy as np

from phoenix.data.indexed import DataError, indexed_dataset_module, read_meta
from phoenix.data.preprocess import PREFIX_SUFFIXES, publish_prefix



def document_ranges(prefix: str) -> np.ndarray:
    """``int64 [documents + 1]``: document ``d`` is sequences ``r[d] .. r[d+1]-1``."""
    ds = indexed_dataset_module().IndexedDataset(prefix, mmap=True)
    return np.asarray(ds.document_indices, dtype=np.int64)


def read_groups(prefix: str, num_documents: int) -> np.ndarray | None:
    """``prefix.groups.npy`` (int64 group id per document), or None without one."""
    path = prefix + ".groups.npy"
    if not os.path.isfile(path):
        return None
    groups = np.load(path)
    if groups.shape != (num_documents,):
        raise DataError(f"data prefix '{prefix}': {path} holds {groups.shape[0]} group ids for "
                        f"{num_documents} documents")
    return groups.astype(np.int64)


def write_subset(prefix: str, out_prefix: str, keep: np.ndarray, record: dict,
                 progress: bool = False) -> dict:
    """Write the documents of ``prefix`` where ``keep`` (bool, one per document) is True
    as ``out_prefix``; ``record`` goes into the meta as ``subset``. Returns the meta."""
    import torch
    from tqdm import tqdm

    module = indexed_dataset_module()
    ds = module.IndexedDataset(prefix, mmap=True)
    docs = np.asarray(ds.document_indices, dtype=np.int64)
    if keep.shape != (len(docs) - 1,):
        raise ValueError(f"keep has {keep.shape} entries for {len(docs) - 1} documents")
    groups = read_groups(prefix, len(docs) - 1)
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = os.path.join(out_dir, f".{os.path.basename(out_prefix)}.tmp-{uuid.uuid4().hex[:12]}")
    tmp = {suffix: tmp_prefix + suffix for suffix in PREFIX_SUFFIXES}
    tokens = 0
    try:
        builder = module.IndexedDatasetBuilder(tmp[".bin"], dtype=ds.index.dtype)
        try:
            for d in tqdm(np.flatnonzero(keep), desc="write kept documents", disable=not progress):
                for s in range(docs[d], docs[d + 1]):
                    seq = ds[int(s)]
                    tokens += len(seq)
                    builder.add_item(torch.from_numpy(np.asarray(seq).astype(np.int64)))
                builder.end_document()
            builder.finalize(tmp[".idx"])
        finally:
            builder.data_file.close()  # finalize() closes it, but not on error
        meta = dict(read_meta(prefix) or {})
        meta.update(name=os.path.basename(out_prefix), num_documents=int(keep.sum()),
                    num_tokens=int(tokens), subset={"source": os.path.abspath(prefix), **record})
        renumbered = None
        if groups is not None:
            _, renumbered = np.unique(groups[keep], return_inverse=True)  # ids stay in order
            renumbered = renumbered.astype(np.int64)
            meta["num_groups"] = int(renumbered.max() + 1) if len(renumbered) else 0
        publish_prefix(tmp, out_prefix, meta, renumbered)
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return meta
