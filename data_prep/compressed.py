"""Compressed input files: .gz, .bz2, .xz and .zst (.zstd), decompressed as a stream.

A compressed file that ends early must stop the preparation with an error about the file: a
partial corpus would otherwise be sharded as if it were whole (or fail later with a misleading
"invalid JSON" at the cut line, or "empty corpus"). The stdlib decompressors raise EOFError at a
stream that ends inside its data; zstandard's `stream_reader` does not (it returns what it could
decompress and then EOF), so zstd files are read frame by frame here, and a file that ends inside
a frame raises the same EOFError. Files of several concatenated frames (pzstd, `cat a.zst b.zst`)
are read whole, as the zstd tool does.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from pathlib import Path
from typing import Optional

from prime_scale.errors import UserError

COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
_READ = 1 << 17  # compressed bytes per read: large enough that the per-call cost does not show


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a zstd file, frame after frame; EOFError where the file ends inside a frame."""

    def __init__(self, raw):
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new()
        self._in_frame = False  # bytes of the current frame were fed and its end was not seen yet
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> bytes:
        parts = []
        while data:
            parts.append(self._frame.decompress(data))
            if self._frame.eof:  # the frame is complete: what follows starts the next one
                data, self._frame, self._in_frame = self._frame.unused_data, self._new(), False
            else:
                data, self._in_frame = b"", True
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._out):
            chunk = self._raw.read(_READ)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._pos = self._feed(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]  # an offset, not a slice of the rest: no copies
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: Path, compression: Optional[str]):
    """A binary stream of the file's (decompressed) bytes; UserError naming the file if it cannot be opened."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bzip2":
        return bz2.BZ2File(raw, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 16)
    return raw


def _stream_errors() -> tuple:
    errors = [OSError, EOFError, zlib.error, lzma.LZMAError]  # gzip's BadGzipFile and bz2's are OSErrors
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


STREAM_ERRORS = _stream_errors()


def read_error(path: Path, compression: Optional[str], lineno: int, e: BaseException) -> UserError:
    """The error for a file that failed while being read (after `lineno` complete lines)."""
    if compression is None:
        return UserError(f"{path}: cannot read the file (after line {lineno}): {e}")
    return UserError(f"{path}: truncated or corrupt compressed stream ({compression}, after line {lineno}: {e}): "
                     "the file is damaged or incompletely copied; copy or download it again (its checksum, if "
                     "published, tells), or leave it out of --input")
