"""JSONL -> megatron-core indexed dataset, plus Phoenix sidecar files.

For an output prefix ``P``:

* ``P.bin``/``P.idx``: megatron-core ``IndexedDataset``; one input document is one sequence
  *and* one document, tokens as ``DType.optimal_dtype(vocab_size)`` (uint16 if vocab < 65500,
  else int32, as megatron does), each followed by the EOD id unless ``append_eod=False``.
* ``P.groups.npy`` (with ``group_key``): int64 group id per document, ids ``0..G-1`` in order
  of first appearance; a group's documents are adjacent (enforced).
* ``P.meta.json``: counts and provenance (see :func:`preprocess`).

Atomicity: all files are written as ``.P.tmp-*`` in the output directory and renamed into
place only when the whole run succeeded (meta last: its presence means the set is complete).
A failure removes the temporaries and leaves no ``P.*``.

Unusable lines (blank, invalid JSON/UTF-8, not an object, text missing / not a string / only
whitespace, group key missing) are skipped, counted and reported as ``file:line`` (1-based)
in a warning and in the meta file; never silently.

Unusable *files* are errors naming the file (:mod:`phoenix.data.jsonl_input`): every input
is checked before any output is started (missing, a directory, unreadable, not the
compression its name says, not UTF-8), and a compressed stream found truncated or corrupt
while reading stops the run with the line it got to. An error while encoding a line in a
worker process comes back as ``file:line: ...``; a worker that dies (killed, out of
memory) stops the run with the lines it was given. In every case no output is published.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from phoenix.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer
from phoenix.data.indexed import indexed_dataset_module
from phoenix.data.jsonl_input import Chunk, InputError, check_input, read_chunks

logger = logging.getLogger(__name__)

MAX_REPORTED_SKIPS = 20
# Rename order on success; meta.json goes last so it marks a complete output set.
PREFIX_SUFFIXES = (".bin", ".idx", ".groups.npy", ".meta.json")


def publish_prefix(tmp: dict, prefix: str, meta: dict, groups: np.ndarray | None) -> None:
    """Finish an output prefix written under temporary names ``tmp`` (suffix -> path, the
    ``.bin``/``.idx`` already there): write ``groups`` (int64 per document, or None) and
    ``meta``, then rename every file into place, ``.meta.json`` last, and remove a
    ``.groups.npy`` an earlier grouped output left at ``prefix``."""
    if groups is not None:
        with open(tmp[".groups.npy"], "wb") as f:
            np.save(f, groups)
    with open(tmp[".meta.json"], "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    for suffix in PREFIX_SUFFIXES:
        if os.path.exists(tmp[suffix]):
            os.replace(tmp[suffix], prefix + suffix)
    if groups is None and os.path.exists(prefix + ".groups.npy"):
        os.remove(prefix + ".groups.npy")  # stale sidecar of an earlier grouped output

# (tokens, canonical group value or "") for a document, or (None, reason) for a skipped line.
_Encoded = tuple[np.ndarray | None, str]
# (source file index, 1-based line number of the first line, per-line payload)
_EncodedChunk = tuple[int, int, list[_Encoded]]


class GroupAdjacencyError(ValueError):
    """A group value reappeared after another group started."""


class EmptyOutputError(ValueError):
    """No input line produced a document."""


class TooManySkippedError(ValueError):
    """More input lines were malformed than ``max_skipped_fraction`` allows."""


class WorkerDiedError(RuntimeError):
    """A tokenizer worker process ended abruptly (killed, out of memory)."""


class _LineError(Exception):
    """Encoding one line raised; carries where, so the main process can name file:line.

    Only positional ``args``: it crosses the process boundary by pickling.
    """

    def __init__(self, src: int, line: int, message: str) -> None:
        super().__init__(src, line, message)


class _Encoder:
    """Parses and tokenizes raw JSONL lines. Runs in the main process or in a pool worker.

    Carries no state between lines, so the output is the same however lines are chunked.
    """

    def __init__(
        self, tokenizer: Tokenizer, text_key: str, group_key: str | None, eod: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.text_key = text_key
        self.group_key = group_key
        self.eod = tokenizer.eod_id if eod else None

    def __call__(self, chunk: Chunk) -> _EncodedChunk:
        src, first, lines = chunk
        out = []
        for offset, line in enumerate(lines):
            try:
                out.append(self._encode_line(line))
            except Exception as e:  # anything unforeseen: stop, naming the line
                raise _LineError(src, first + offset, f"{type(e).__name__}: {e}") from None
        return src, first, out

    def _encode_line(self, raw: bytes) -> _Encoded:
        if not raw.strip():
            return None, "blank line"
        try:
            # Decoded here, not by json.loads: given bytes, it would guess UTF-16/32 too.
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, f"invalid UTF-8 (byte {e.start})"
        except json.JSONDecodeError as e:
            return None, f"invalid JSON ({e.msg})"
        except RecursionError:
            return None, "invalid JSON (nested too deeply)"
        if not isinstance(obj, dict):
            return None, f"not a JSON object ({type(obj).__name__})"
        if self.text_key not in obj:
            return None, f"missing key {self.text_key!r}"
        text = obj[self.text_key]
        if not isinstance(text, str):
            return None, f"key {self.text_key!r} is {type(text).__name__}, not a string"
        if not text.strip():
            return None, f"empty text in key {self.text_key!r}"
        group = ""
        if self.group_key is not None:
            value = obj.get(self.group_key)
            if value is None or isinstance(value, (dict, list)):
                return None, f"missing or non-scalar group key {self.group_key!r}"
            # Canonical JSON keeps 1 and "1" distinct and is hashable.
            group = json.dumps(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (JSON "\ud800" escapes) make spm raise
            return None, f"key {self.text_key!r} is not valid Unicode (lone surrogate)"
        ids = self.tokenizer.encode(text)
        if self.eod is not None:
            ids.append(self.eod)
        return np.asarray(ids, dtype=np.int32), group


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(*encoder_args: Any) -> None:
    # Build the tokenizer once per worker, not once per chunk.
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(*encoder_args)


def _encode_in_worker(chunk: Chunk) -> _EncodedChunk:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(chunk)


def _encode_ordered(
    chunks: Iterable[Chunk], encoder: _Encoder, workers: int, paths: Sequence[str]
) -> Iterator[_EncodedChunk]:
    """Encode chunks in input order, in-process or with a ``workers``-process pool.

    The pool is fed through a bounded window of ``4 * workers`` chunks rather than
    ``map``, which would read the whole input into memory ahead of us. "spawn" avoids
    forking a parent that holds torch / tqdm threads. A ``ProcessPoolExecutor``, not a
    ``multiprocessing.Pool``: when a worker dies, the pool reports it instead of waiting
    forever for the lost task.

    Raises:
        InputError: encoding a line raised (``file:line: ...``).
        WorkerDiedError: a worker process ended abruptly.
    """
    def result(chunk: Chunk, future: Any) -> _EncodedChunk:
        src, first, lines = chunk
        try:
            return future.result()
        except _LineError as e:
            src, line, message = e.args
            raise InputError(f"{paths[src]}:{line}: cannot encode this line: {message}") from None
        except BrokenProcessPool:
            raise WorkerDiedError(
                f"a tokenizer worker process died (killed, or out of memory?) before {paths[src]} "
                f"lines {first}-{first + len(lines) - 1} were encoded; nothing was written"
            ) from None

    if workers == 1:
        for chunk in chunks:
            try:
                yield encoder(chunk)
            except _LineError as e:
                src, line, message = e.args
                raise InputError(f"{paths[src]}:{line}: cannot encode this line: {message}") from None
        return
    args = (encoder.tokenizer, encoder.text_key, encoder.group_key, encoder.eod is not None)
    pool = ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, args)
    try:
        pending: deque[tuple[Chunk, Any]] = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_encode_in_worker, chunk)))
            if len(pending) >= 4 * workers:
                yield result(*pending.popleft())
        while pending:
            yield result(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Stats:
    """Running totals; ``groups[i]`` is the group id of document ``i``."""

    group_key: str | None
    num_documents: int = 0
    num_tokens: int = 0
    num_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    group_ids: dict[str, int] = field(default_factory=dict)
    current_group: str | None = None

    def skip(self, where: str, reason: str) -> None:
        self.num_skipped += 1
        if len(self.skipped_examples) < MAX_REPORTED_SKIPS:
            self.skipped_examples.append(f"{where}: {reason}")

    def add(self, where: str, num_tokens: int, group: str) -> None:
        if self.group_key is not None and group != self.current_group:
            if group in self.group_ids:
                raise GroupAdjacencyError(
                    f"{where}: group {group} (key {self.group_key!r}) reappears after group "
                    f"{self.current_group} started; a group's documents must be adjacent"
                )
            self.group_ids[group] = len(self.group_ids)
            self.current_group = group
        if self.group_key is not None:
            self.groups.append(self.group_ids[group])
        self.num_documents += 1
        self.num_tokens += num_tokens


def _write_dataset(
    paths: Sequence[str], tmp: dict[str, str], encoder: _Encoder, dtype: type[np.number],
    workers: int, chunk_lines: int, progress: bool | None,
) -> _Stats:  # fmt: skip
    # Lazy: only the writer needs torch / megatron; pool workers stay light.
    import torch
    IndexedDatasetBuilder = indexed_dataset_module().IndexedDatasetBuilder

    stats = _Stats(encoder.group_key)
    start = time.perf_counter()
    chunks = _encode_ordered(read_chunks(paths, chunk_lines), encoder, workers, paths)
    builder = IndexedDatasetBuilder(tmp[".bin"], dtype=dtype)
    try:
        with (
            tqdm(unit="doc", disable=None if progress is None else not progress) as bar,
            contextlib.closing(chunks),  # closing() shuts the pool down on errors
        ):
            for src, first, results in chunks:
                docs_before = stats.num_documents
                for offset, (tokens, info) in enumerate(results):
                    where = f"{paths[src]}:{first + offset}"
                    if tokens is None:
                        stats.skip(where, info)
                        continue
                    stats.add(where, len(tokens), info)
                    # One sequence per document: Phoenix packs documents itself downstream.
                    builder.add_item(torch.from_numpy(tokens))
                    builder.end_document()
                bar.update(stats.num_documents - docs_before)
                tokens_per_s = stats.num_tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tokens_per_s=f"{tokens_per_s:,.0f}", refresh=False)
        builder.finalize(tmp[".idx"])
    finally:
        # megatron's builder has no close(); finalize() closes the file, but not on error.
        builder.data_file.close()
    return stats


def preprocess(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_prefix: str | os.PathLike[str],
    tokenizer_model: str | os.PathLike[str],
    *,
    text_key: str = "text",
    append_eod: bool = True,
    group_key: str | None = None,
    workers: int = 1,
    name: str | None = None,
    tags: Iterable[str] | str = (),
    chunk_lines: int = 256,
    progress: bool | None = None,
    max_skipped_fraction: float | None = None,
) -> dict[str, Any]:
    """Tokenize JSONL files (plain or ``.gz``) into ``output_prefix.{bin,idx,meta.json}``.

    Output is byte-identical for any ``workers``/``chunk_lines``. ``progress=None`` shows a
    progress bar only on a terminal. Returns the meta dict also written to ``.meta.json``:
    ``name, tags, num_documents, num_tokens, dtype, tokenizer_model, tokenizer_fingerprint,
    tokenizer_vocab_size, eod_id, append_eod, text_key, group_key, num_groups, source_files,
    skipped_lines, skipped_examples`` (first ``MAX_REPORTED_SKIPS`` as ``"file:line: why"``).

    Raises:
        FileNotFoundError: an input file or the tokenizer model is missing (before any work).
        InputError: an input file or the tokenizer model cannot be used (before any work:
            see :func:`phoenix.data.jsonl_input.check_input`), or, found while reading, a
            compressed input is truncated or corrupt or a line cannot be encoded.
        WorkerDiedError: a tokenizer worker process ended abruptly.
        GroupAdjacencyError: a group's documents are not adjacent.
        EmptyOutputError: no line produced a document (no files are written).
        TooManySkippedError: more than ``max_skipped_fraction`` of the input lines were
            malformed (None: no limit; no files are written).
    """
    paths = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not paths:
        raise ValueError("no input files given")
    for path in paths:
        check_input(path)
    model_path = os.fspath(tokenizer_model)
    is_hf = model_path.endswith(".json") or os.path.isfile(os.path.join(model_path, "tokenizer.json"))
    if os.path.isdir(model_path) and not is_hf:
        raise InputError(f"tokenizer model {model_path}: is a directory without a tokenizer.json, "
                         f"not a .model file")
    try:
        tokenizer = load_tokenizer(model_path) if is_hf else SentencePieceTokenizer(model_path)
    except ValueError as e:  # not a tokenizer.json, or a special token it lacks
        raise InputError(f"tokenizer {model_path}: {e}") from None
    except RuntimeError as e:  # sentencepiece's parse error: "INTERNAL: ... ParseFromArray ..."
        raise InputError(f"tokenizer model {model_path}: not a SentencePiece model "
                         f"({str(e).strip().splitlines()[0][:120]})") from None
    encoder = _Encoder(tokenizer, text_key, group_key, append_eod)  # fails early without EOS
    if workers < 1 or chunk_lines < 1:
        raise ValueError(f"workers and chunk_lines must be >= 1, got {workers}, {chunk_lines}")
    tag_list = [t.strip() for t in (tags.split(",") if isinstance(tags, str) else tags)]

    # Lazy: importing megatron.core takes seconds, and pool workers never need it.
    DType = indexed_dataset_module().DType

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = os.fspath(output_prefix)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    # Same directory as the outputs, so the final os.replace is an atomic rename.
    tmp_prefix = os.path.join(out_dir, f".{os.path.basename(prefix)}.tmp-{uuid.uuid4().hex[:12]}")
    tmp = {suffix: tmp_prefix + suffix for suffix in PREFIX_SUFFIXES}
    start = time.perf_counter()
    try:
        stats = _write_dataset(paths, tmp, encoder, dtype, workers, chunk_lines, progress)
        if stats.num_skipped:
            logger.warning(
                "skipped %d malformed input line(s) (first %d listed):\n  %s",
                stats.num_skipped, len(stats.skipped_examples), "\n  ".join(stats.skipped_examples),
            )  # fmt: skip
        lines = stats.num_skipped + stats.num_documents
        if (max_skipped_fraction is not None and stats.num_documents
                and stats.num_skipped > max_skipped_fraction * lines):
            # Half a file dropped usually means the wrong --text-key or a broken export,
            # not a few bad records: publish nothing rather than a silently smaller set.
            raise TooManySkippedError(
                f"{stats.num_skipped} of {lines} input lines "
                f"({stats.num_skipped / lines:.1%}) are malformed, more than "
                f"--max-skipped-fraction {max_skipped_fraction:g} allows (first: "
                f"{stats.skipped_examples[0]}); nothing written to {prefix}.*")
        if stats.num_documents == 0:
            raise EmptyOutputError(
                f"no documents produced from {paths} ({stats.num_skipped} line(s) skipped); "
                f"nothing written to {prefix}.*"
            )
        meta: dict[str, Any] = {
            "name": name or os.path.basename(prefix),
            "tags": [t for t in tag_list if t],
            "num_documents": stats.num_documents,
            "num_tokens": stats.num_tokens,
            "dtype": np.dtype(dtype).name,
            "tokenizer_model": os.path.abspath(tokenizer.model_file),
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "eod_id": encoder.eod,
            "append_eod": append_eod,
            "text_key": text_key,
            "group_key": group_key,
            "num_groups": len(stats.group_ids) if group_key is not None else None,
            "source_files": [os.path.abspath(p) for p in paths],
            "skipped_lines": stats.num_skipped,
            "skipped_examples": stats.skipped_examples,
        }
        publish_prefix(tmp, prefix, meta,
                       np.asarray(stats.groups, dtype=np.int64) if group_key is not None else None)
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    secs = max(time.perf_counter() - start, 1e-9)
    logger.info(
        "wrote %s.{bin,idx}: %d documents, %d tokens (%s)%s, %d skipped lines; "
        "%.1fs, %.0f docs/s, %.0f tokens/s",
        prefix, stats.num_documents, stats.num_tokens, meta["dtype"],
        "" if meta["num_groups"] is None else f", {meta['num_groups']} groups",
        stats.num_skipped, secs, stats.num_documents / secs, stats.num_tokens / secs,
    )  # fmt: skip
    return meta
