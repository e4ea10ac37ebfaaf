"""Sample indices cached on disk as ``.npy`` files and memory-mapped on load.

Cutting a dataset into samples (:func:`phoenix.data.samples.build_sample_index`) reads
its whole ``.idx`` and builds arrays of 12-20 bytes per sample plus 8 per document: at
tens of billions of tokens, seconds and gigabytes on every rank at every start. Here it
is done once per *key* and published into the run's ``data.cache_dir`` as a directory
``samples-<name>-<key>/`` of ``.npy`` files (renamed into place whole, see
:func:`phoenix.io.publish_dir`); every later start, on every rank, maps those files
read-only (``np.load(mmap_mode="r")``), so the pages are read on demand and shared
between the ranks of a node through the page cache.

The key covers everything the index depends on: the prefix's resolved path; the
``.idx``'s size, modification time and the sha256 of its first and last 64 KiB (header,
first and last sequence lengths and document indices); the ``.bin``'s size; with groups,
the same for ``.groups.npy``; ``seq_length``, grouped or not, ``min_document_tokens``,
``pack_groups`` and :data:`INDEX_FORMAT`. A rewritten ``.idx``, a new groups file or another cut is a
miss and builds a new entry; stale entries are left for the user to delete.

Two processes building the same entry at once (two jobs, or one rank per node on a
shared filesystem) both build it; the first rename wins and the other discards its own
copy and maps the winner's, which is the same bytes (the build is deterministic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from phoenix.data.indexed import check_prefix
from phoenix.data.samples import DocumentView, SampleIndex, build_sample_index
from phoenix.io import publish_dir

log = logging.getLogger(__name__)

INDEX_FORMAT = 2  # 2: group packing (pack_groups); views named in index.json
_EDGE = 1 << 16  # bytes hashed at each end of a file


def _file_identity(path: Path) -> dict:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > _EDGE:
            f.seek(max(_EDGE, st.st_size - _EDGE))
            h.update(f.read(_EDGE))
    return dict(size=st.st_size, mtime_ns=st.st_mtime_ns, edges=h.hexdigest())


def sample_index_key(prefix: str, seq_length: int, use_groups: bool,
                     min_document_tokens: int = 0, pack_groups: int = 0) -> str:
    """sha256 of everything :func:`build_sample_index` reads and is asked for (see the
    module doc). Raises DataError naming the file when the prefix is incomplete."""
    try:
        idx = _file_identity(Path(prefix + ".idx"))
        bin_size = os.stat(prefix + ".bin").st_size
    except OSError:
        check_prefix(prefix)  # names the missing file
        raise
    groups_path = Path(prefix + ".groups.npy")
    groups = _file_identity(groups_path) if use_groups and groups_path.is_file() else None
    doc = dict(format=INDEX_FORMAT, prefix=os.path.realpath(prefix), idx=idx, bin_size=bin_size,
               groups=groups, seq_length=int(seq_length), grouped=bool(use_groups),
               min_document_tokens=int(min_document_tokens),
               pack_groups=int(pack_groups) if use_groups else 0)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cached_sample_index(prefix: str, seq_length: int, use_groups: bool,
                        min_document_tokens: int = 0,
                        cache_dir: str | os.PathLike | None = None,
                        pack_groups: int = 0) -> SampleIndex:
    """The sample index of ``prefix`` (as :func:`build_sample_index`), memory-mapped from
    ``cache_dir``, built and published there first if missing. ``cache_dir=None``: built
    in memory, nothing cached."""
    pack_groups = pack_groups if use_groups else 0
    if cache_dir is None:
        return build_sample_index(prefix, seq_length, use_groups, min_document_tokens, pack_groups)
    key = sample_index_key(prefix, seq_length, use_groups, min_document_tokens, pack_groups)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(prefix).name)[:40]
    path = Path(cache_dir) / f"samples-{name}-{key[:16]}"
    if not (path / "index.json").is_file():
        t0 = time.perf_counter()
        index = build_sample_index(prefix, seq_length, use_groups, min_document_tokens,
                                   pack_groups)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        published = publish_dir(path, lambda tmp: _save(index, key, tmp))
        log.info("sample index: %s %s in %.1fs -> %s", prefix,
                 "built" if published else "built (another process published it first)",
                 time.perf_counter() - t0, path)
        del index  # use the mapped copy: its pages are shared, the built arrays are not
    return load_sample_index(path, prefix, key)


_ARRAYS = ("starts", "lengths", "group_ids", "doc_starts")
_VIEW_ARRAYS = ("documents", "starts", "bin_starts")


def _save(index: SampleIndex, key: str, directory: Path) -> None:
    for name in _ARRAYS:
        array = getattr(index, name)
        if array is not None:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(array))
    if index.view is not None:
        for name in _VIEW_ARRAYS:
            np.save(directory / f"view_{name}.npy", getattr(index.view, name))
    meta = dict(format=INDEX_FORMAT, key=key, prefix=index.prefix, seq_length=index.seq_length,
                grouped=index.group_ids is not None, num_samples=len(index),
                min_document_tokens=index.view.min_document_tokens if index.view else 0,
                view=index.view is not None, pack_groups=index.pack_groups,
                groups_digest=index.groups_digest)
    (directory / "index.json").write_text(json.dumps(meta, indent=1))


def load_sample_index(path: str | os.PathLike, prefix: str, key: str) -> SampleIndex:
    """The index published at ``path``, its arrays memory-mapped read-only; ValueError
    if it was built for another key."""
    path = Path(path)
    meta = json.loads((path / "index.json").read_text())
    if meta.get("format") != INDEX_FORMAT or meta.get("key") != key:
        raise ValueError(f"sample index {path} was built from other inputs (key "
                         f"{meta.get('key')} != {key}); delete it to rebuild")

    def array(name):
        file = path / f"{name}.npy"
        return np.load(file, mmap_mode="r") if file.is_file() else None

    view = None
    if meta["view"]:
        view = DocumentView(meta["min_document_tokens"],
                            *(array(f"view_{name}") for name in _VIEW_ARRAYS))
    return SampleIndex(prefix, meta["seq_length"], array("starts"), array("lengths"),
                       array("group_ids"), array("doc_starts"), view,
                       pack_groups=meta["pack_groups"], groups_digest=meta["groups_digest"])
