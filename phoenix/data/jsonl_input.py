"""Reading JSONL input files for ``phoenix preprocess``: plain or compressed, checked first.

A file is decompressed by its name: ``.gz`` (gzip), ``.bz2`` (bzip2), ``.xz`` (xz);
anything else is read as plain UTF-8 JSONL. :func:`check_input` opens every file before
any work starts and raises :class:`InputError` (naming the file) when it cannot be read,
is a directory, is not what its name says (a plain file named ``.gz``, a gzip file named
``.jsonl``, a zstd or zip archive), does not even start as valid compressed data, or is
not UTF-8 text (a UTF-16/32 byte-order mark, NUL bytes). Damage further in -- a
truncated or corrupt stream, a read error -- can only show while reading;
:func:`read_chunks` then raises :class:`InputError` naming the file and how far it was
read (the last complete line and the bytes decompressed until then).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Callable

from phoenix.data.indexed import DataError

# (source file index, 1-based line number of the first line, raw lines)
Chunk = tuple[int, int, list[bytes]]

_OPENERS: dict[str, tuple[str, Callable[[str], IO[bytes]]]] = {
    ".gz": ("gzip", lambda p: gzip.open(p, "rb")),
    ".bz2": ("bzip2", lambda p: bz2.open(p, "rb")),
    ".xz": ("xz", lambda p: lzma.open(p, "rb")),
}
# Leading bytes of compressed formats: readable ones and the ones we name in errors.
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
          b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
_SUFFIX_OF = {fmt: suffix for suffix, (fmt, _) in _OPENERS.items()}
_WIDE_BOMS = {b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe\x00\x00": "UTF-32",
              b"\xfe\xff": "UTF-16", b"\xff\xfe": "UTF-16"}
_UTF8_BOM = b"\xef\xbb\xbf"
# Errors a damaged stream raises while decompressing (BadGzipFile is an OSError).
_STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
_PROBE_BYTES = 64 * 1024


class InputError(DataError):
    """An input file cannot be used; the message names the file (and how far it was read)."""


def _format(path: str) -> str | None:
    """Compression format implied by the file name (None: plain)."""
    for suffix, (fmt, _) in _OPENERS.items():
        if path.endswith(suffix):
            return fmt
    return None


def open_input(path: str) -> IO[bytes]:
    """The decompressed byte stream of ``path`` (by its name)."""
    for suffix, (_, opener) in _OPENERS.items():
        if path.endswith(suffix):
            return opener(path)
    return open(path, "rb")


def check_input(path: str) -> None:
    """Raise FileNotFoundError (missing) or :class:`InputError` if ``path`` is unusable.

    Reads at most the first 64 KiB (decompressed): cheap, but catches the wrong file, the
    wrong format and the wrong encoding before any output is started.
    """
    if not os.path.lexists(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a JSONL file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: is not a regular file (a broken link, a device or a pipe?)")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    named = _format(path)
    actual = next((fmt for magic, fmt in _MAGIC.items() if head.startswith(magic)), None)
    if named is not None and actual != named:
        what = "is empty" if not head else (f"is {actual}-compressed" if actual
                                            else f"is not {named} data (starts with {head!r})")
        raise InputError(f"{path}: named like a {named} file, but {what}")
    if named is None and actual is not None:
        fix = (f"name it *{_SUFFIX_OF[actual]}" if actual in _SUFFIX_OF
               else "decompress it first; readable: plain, .gz, .bz2, .xz")
        raise InputError(f"{path}: is {actual}-compressed, but its name says plain JSONL ({fix})")
    line_no, nbytes = 0, 0
    try:
        with open_input(path) as f:
            while nbytes < _PROBE_BYTES:
                line = f.readline(_PROBE_BYTES)  # bounded: a binary file may have no newline
                if not line:
                    break
                if nbytes == 0:
                    wide = next((enc for bom, enc in _WIDE_BOMS.items() if line.startswith(bom)), None)
                    if wide is not None:
                        raise InputError(f"{path}: is {wide} text (byte-order mark); JSONL input "
                                         f"must be UTF-8")
                if b"\x00" in line:
                    raise InputError(f"{path}: has a NUL byte on line {line_no + 1} (UTF-16 text "
                                     f"or a binary file?); JSONL input must be UTF-8")
                line_no += line.endswith(b"\n")
                nbytes += len(line)
    except _STREAM_ERRORS as e:
        raise InputError(_damaged(path, line_no, nbytes, e)) from None


def _damaged(path: str, line_no: int, nbytes: int, error: BaseException) -> str:
    fmt = _format(path)
    what = f"{fmt} data is truncated or corrupt" if fmt else "read error"
    return (f"{path}: {what} after line {line_no} ({nbytes} bytes "
            f"{'decompressed' if fmt else 'read'}): {error}")


def read_chunks(paths: Sequence[str], chunk_lines: int) -> Iterator[Chunk]:
    """Raw lines of every file in order, ``chunk_lines`` at a time.

    Binary mode: lines split on ``b"\\n"`` only, and bad UTF-8 is reported per line. A
    UTF-8 byte-order mark at the start of a file is dropped.
    """
    for src, path in enumerate(paths):
        line_no, nbytes = 0, 0
        try:
            with open_input(path) as f:
                buf: list[bytes] = []
                first = 1
                for line in f:
                    if line_no == 0 and line.startswith(_UTF8_BOM):
                        line = line[len(_UTF8_BOM):]
                    line_no += 1
                    nbytes += len(line)
                    buf.append(line)
                    if len(buf) == chunk_lines:
                        yield src, first, buf
                        buf, first = [], line_no + 1
                if buf:
                    yield src, first, buf
        except _STREAM_ERRORS as e:
            raise InputError(_damaged(path, line_no, nbytes, e)) from None
