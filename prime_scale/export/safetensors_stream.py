"""Write one safetensors file tensor by tensor, never holding more than the tensor being written.

safetensors' own save_file needs every tensor in memory at once. The format is simple enough to
stream (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header
length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}
padded with spaces to a multiple of 8, then the raw little-endian bytes of every tensor back to back.
All shapes and dtypes are known before the first byte (they come from the checkpoint manifest), so
the header is written first and the tensors follow in order.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class StreamWriter:
    """with StreamWriter(path, [(name, dtype, shape), ...]) as w: w.write(name, tensor) in that order."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[dict[str, str]] = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this machine is big-endian")
        self.path = Path(path)
        self.expected = []
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"tensor {name!r} listed twice")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, dtype, tuple(int(s) for s in shape)))
            offset += nbytes
        self.total_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.expected):
            raise ValueError(f"unexpected tensor {name!r}: all {len(self.expected)} tensors are written")
        want_name, want_dtype, want_shape = self.expected[self.next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise ValueError(f"tensor #{self.next}: expected {want_name} {want_dtype} {list(want_shape)}, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        if tensor.numel():
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self.f.write(memoryview(raw.numpy()))
        self.next += 1

    def close(self) -> None:
        if self.f.closed:
            return
        try:
            if self.next != len(self.expected):
                raise ValueError(f"{self.path}: only {self.next} of {len(self.expected)} tensors written")
            self.f.flush()
            os.fsync(self.f.fileno())
        finally:
            self.f.close()

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.f.close()
