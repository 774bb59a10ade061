"""The codec's reading and writing primitives: a Reader that refuses every claim the bytes present cannot hold, unary
codes read in bounded windows, bit fields cut in chunks, sign bits, scales, and the check of a payload's parameters
against the receiver's method (`expect`)."""
import math
import struct

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

COUNT = struct.Struct("<I")
SCALE_DTYPE = np.dtype("<f4")
UNARY_WINDOW = 1 << 16  # bytes of unary codes searched at once: 0.5 MB of bits, at most 4 MB of their positions
FIELD_CHUNK = 1 << 20  # bit fields cut out at once: a few arrays of 8 MB


class PayloadError(ValueError):
    """Bytes that are not a well-formed upload for this model."""


def expect(method, key, value, what):
    """Refuse `value`, read from a payload, unless it is `method`'s `key` (when `method` gives that key)."""
    if key in method and value != method[key]:
        raise PayloadError(f"{what} {value}, where this run's {key} is {method[key]}")


class Reader:
    """Reads consecutive fields of a payload, failing cleanly when it is too short."""

    def __init__(self, payload):
        self.payload, self.offset = memoryview(payload), 0

    def take(self, size):
        if self.offset + size > len(self.payload):
            raise PayloadError("payload ends early")
        start, self.offset = self.offset, self.offset + size
        return self.payload[start:self.offset]

    def peek(self, start, size):
        """`size` bytes from `start` bytes past the current offset (fewer where the payload ends), not consumed."""
        return np.frombuffer(self.payload[self.offset + start:self.offset + start + size], dtype=np.uint8)

    def skip(self, size):
        self.take(size)

    def unpack(self, layout):
        return layout.unpack(self.take(layout.size))

    def array(self, dtype, count):
        dtype = np.dtype(dtype)
        return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype)

    def count(self, item_size=COUNT.size):
        """A u32 count of items that each take at least `item_size` bytes, refused when they cannot all be here."""
        (count,) = self.unpack(COUNT)
        self.require_bits(8 * count * item_size, f"{count} items")
        return count

    def require_bits(self, bits, what):
        """Refuse a claim the bytes left cannot hold, before anything the size of the claim is made."""
        if bits > 8 * self.remaining():
            raise PayloadError(f"{self.remaining()} bytes left cannot hold {what}")

    def remaining(self):
        return len(self.payload) - self.offset

    def done(self):
        return self.remaining() == 0


def read_unary(reader, count, largest, longest_bits, what):
    """`count` unary-coded integers (that many zeros, then a one), byte-padded, each at most `largest` and together
    taking at most `longest_bits`: uint8 where `largest` fits, else int64. The bytes are searched for the codes' ones
    UNARY_WINDOW bytes at a time, so that what is made beside the integers stays a few MB whatever the bytes hold (one
    window over every bit they could take made 8 bytes per bit: 1.5 GB for a 24 MB payload of ones)."""
    reader.require_bits(count, what)  # a one bit each, at least
    integers = np.empty(count, dtype=np.uint8 if largest < 256 else np.int64)
    searched = min(math.ceil(longest_bits / 8), reader.remaining())
    found, last_end, start = 0, -1, 0
    while found < count and start < searched:
        window = np.unpackbits(reader.peek(start, min(UNARY_WINDOW, searched - start)))
        ends = np.flatnonzero(window)[:count - found] + 8 * start
        if len(ends):
            lengths = np.diff(ends, prepend=last_end) - 1
            if lengths.max() > largest:
                raise PayloadError(f"{what} hold one above {largest}")
            integers[found:found + len(ends)] = lengths
            found, last_end = found + len(ends), int(ends[-1])
        start += UNARY_WINDOW
    if found < count:
        raise PayloadError(f"{what} end early")
    used = last_end // 8 + 1 if count else 0
    if count and reader.peek(used - 1, 1)[0] & ((1 << (7 - last_end % 8)) - 1):
        raise PayloadError(f"nonzero padding after the {what}")
    reader.skip(used)
    return integers


def read_bits(data, count, width):
    """`count` unsigned `width`-bit integers packed most significant bit first, as int64. Each is cut from the 8
    bytes that begin at the byte holding its first bit (so width <= 57, and Rice parameters are at most the model
    size's bit length), FIELD_CHUNK at a time: 8 bytes of memory per integer, where unpacking would take one or more
    per bit."""
    out = np.zeros(count, dtype=np.int64)
    if width:
        padded = padded_bytes(data)
        for start in range(0, count, FIELD_CHUNK):
            stop = min(count, start + FIELD_CHUNK)
            out[start:stop] = read_fields(padded, np.arange(start * width, stop * width, width, dtype=np.uint64),
                                          np.uint64(width))
    return out


def padded_bytes(data):
    """`data` and 8 zero bytes, which the 8 bytes read_fields cuts the last integers from run into."""
    return np.concatenate([data, np.zeros(8, dtype=np.uint8)])


def read_fields(padded, first_bits, widths):
    """Unsigned integers packed most significant bit first in `padded` (padded_bytes), the i-th `widths[i]` bits (at
    most 57, or 0) from bit `first_bits[i]` (uint64, overwritten), as int64; `widths` may be one width for all."""
    words = sliding_window_view(padded, 8)[first_bits >> np.uint64(3)].view(">u8").ravel().astype(np.uint64)
    first_bits &= np.uint64(7)  # now each integer's offset in its first byte
    words <<= first_bits
    words >>= np.uint64(1)  # 64 - width in two shifts: a shift by 64 (a width of 0) is undefined
    words >>= np.uint64(63) - widths
    return words.view(np.int64)


def check_padding(data, used_bits, what):
    """The bits of `data`'s last byte after its first `used_bits` bits must be zero: one payload, one encoding."""
    spare = 8 * len(data) - used_bits
    if spare and data[-1] & ((1 << spare) - 1):
        raise PayloadError(f"nonzero padding after the {what}")


def flat_bytes(tensors, dtype):
    if not tensors:
        return b""
    return torch.cat([t.reshape(-1) for t in tensors]).cpu().numpy().astype(dtype, copy=False).tobytes()


def pack_bits(bools):
    return np.packbits(torch.cat(bools).cpu().numpy()).tobytes() if bools else b""


def unpack_bits(reader, count):
    data = reader.array(np.uint8, math.ceil(count / 8))
    check_padding(data, count, "sign bits")
    return torch.from_numpy(np.unpackbits(data, count=count).astype(bool))


def read_scales(reader, count):
    scales = reader.array(SCALE_DTYPE, count).astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise PayloadError("a scale or magnitude is negative, NaN or Inf")
    return scales


def split(flat, counts):
    return list(flat.split(counts)) if counts else []
