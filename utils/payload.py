"""The upload's wire format. `encode` (client side) is the only code that writes it, `decode` (server side) the only
code that reads it, and an upload's size is the length of the bytes `encode` returns.

Layout, little-endian:
    header   version u8 | kind u8 | num_samples u32 | num_tensors u32
    random   mask_seed u64 | prop f64, then per tensor: the kept values (f32). The receiver regenerates the mask
             from (mask_seed, prop), so no positions travel.
    topk     per tensor: positions code u8 | count u32 | positions | values (count f32); positions are a bitmap
             (ceil(numel/8) bytes) or a list of u8/u16/u32 indices, whichever is smaller.
    dense    per tensor: all values (numel f32).
Tensors come in the order of the model's floating-point state-dict entries, flattened; integer buffers (such as
BatchNorm's num_batches_tracked) are not sent.
"""
import math
import struct

import numpy as np
import torch

VERSION = 1
DENSE, RANDOM, TOPK = 0, 1, 2
BITMAP = 0
INDEX_DTYPES = {1: "<u1", 2: "<u2", 3: "<u4"}  # positions code -> index integer type
HEADER = struct.Struct("<BBII")
RANDOM_HEADER = struct.Struct("<Qd")
TENSOR_HEADER = struct.Struct("<BI")
VALUE_DTYPE = np.dtype("<f4")


class PayloadError(ValueError):
    """Bytes that are not a well-formed upload for this model."""


def dense_size(numels):
    """Bytes of a dense upload (every value) of a model whose floating tensors have `numels` entries."""
    return HEADER.size + VALUE_DTYPE.itemsize * sum(numels)


def random_positions(seed, prop, numels):
    """Per tensor, the sorted flat positions a Bernoulli(prop) mask keeps; the same on every machine for a seed."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(numel, generator=generator) < prop).nonzero().squeeze(1) for numel in numels]


def encode(kind, diffs, positions, num_samples, mask_seed=0, prop=0.0):
    """Bytes carrying `diffs` (flat float tensors) at `positions` (sorted int64 tensors; None: every entry)."""
    chunks = [HEADER.pack(VERSION, kind, num_samples, len(diffs))]
    if kind == RANDOM:
        chunks.append(RANDOM_HEADER.pack(mask_seed, prop))
    for diff, kept in zip(diffs, positions):
        values = diff if kept is None else diff[kept.to(diff.device)]
        if kind == TOPK:
            code, encoded = _encode_positions(kept.cpu().numpy(), diff.numel())
            chunks += [TENSOR_HEADER.pack(code, len(kept)), encoded]
        chunks.append(values.detach().to("cpu", torch.float32).numpy().astype(VALUE_DTYPE, copy=False).tobytes())
    return b"".join(chunks)


def _encode_positions(kept, numel):
    width_code = 1 if numel <= 2**8 else 2 if numel <= 2**16 else 3
    index_bytes = len(kept) * np.dtype(INDEX_DTYPES[width_code]).itemsize
    if index_bytes < math.ceil(numel / 8):
        return width_code, kept.astype(INDEX_DTYPES[width_code]).tobytes()
    bitmap = np.zeros(numel, dtype=bool)
    bitmap[kept] = True
    return BITMAP, np.packbits(bitmap).tobytes()


def decode(payload, numels):
    """(num_samples, positions, values) from bytes; per tensor, positions is None when every entry was sent."""
    reader = _Reader(payload)
    version, kind, num_samples, num_tensors = reader.unpack(HEADER)
    if version != VERSION or kind not in (DENSE, RANDOM, TOPK):
        raise PayloadError(f"unknown payload version {version} or kind {kind}")
    if num_tensors != len(numels):
        raise PayloadError(f"payload holds {num_tensors} tensors, the model has {len(numels)}")
    if kind == RANDOM:
        mask_seed, prop = reader.unpack(RANDOM_HEADER)
        if not 0 <= prop <= 1:  # NaN fails too
            raise PayloadError(f"mask density {prop} is not in [0, 1]")
        positions = random_positions(mask_seed, prop, numels)
    else:
        positions = []
    values = []
    for i, numel in enumerate(numels):
        if kind == TOPK:
            code, count = reader.unpack(TENSOR_HEADER)
            positions.append(_decode_positions(reader, code, count, numel))
        elif kind == DENSE:
            positions.append(None)
        count = numel if positions[i] is None else len(positions[i])
        values.append(torch.from_numpy(reader.array(VALUE_DTYPE, count).astype(np.float32)))
    if not reader.done():
        raise PayloadError(f"payload has {reader.remaining()} bytes after its last tensor")
    return num_samples, positions, values


def _decode_positions(reader, code, count, numel):
    if code == BITMAP:
        bits = np.unpackbits(reader.array(np.uint8, math.ceil(numel / 8)), count=numel)
        kept = np.flatnonzero(bits)
        if len(kept) != count:
            raise PayloadError(f"bitmap marks {len(kept)} entries, header says {count}")
    elif code in INDEX_DTYPES:
        kept = reader.array(INDEX_DTYPES[code], count).astype(np.int64)
        if count and (kept.max() >= numel or np.any(np.diff(kept) <= 0)):
            raise PayloadError("index list out of range or not strictly increasing")
    else:
        raise PayloadError(f"unknown positions code {code}")
    return torch.from_numpy(kept)


class _Reader:
    """Reads consecutive fields of a payload, failing cleanly when it is too short."""

    def __init__(self, payload):
        self.payload, self.offset = memoryview(payload), 0

    def _take(self, size):
        if self.offset + size > len(self.payload):
            raise PayloadError("payload ends early")
        start, self.offset = self.offset, self.offset + size
        return self.payload[start:self.offset]

    def unpack(self, layout):
        return layout.unpack(self._take(layout.size))

    def array(self, dtype, count):
        dtype = np.dtype(dtype)
        return np.frombuffer(self._take(dtype.itemsize * count), dtype=dtype)

    def remaining(self):
        return len(self.payload) - self.offset

    def done(self):
        return self.remaining() == 0
