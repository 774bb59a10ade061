"""Quantizers: how each kept value is written, one class per method, registered by its config name in QUANTIZERS (the
layout of each one's values is in codec/__init__.py)."""
import math
import struct

import numpy as np
import torch

from codec.wire import (FIELD_CHUNK, SCALE_DTYPE, PayloadError, check_padding, expect, flat_bytes, pack_bits,
                        padded_bytes, read_bits, read_fields, read_scales, read_unary, split, unpack_bits)


QSGD_HEADER = struct.Struct("<HI")
FIXED_HEADER = struct.Struct("<Bd")
# fixed_range's bounds: its step stays a normal float32 (>= 2^-126 for 24 bits) and its values finite
FIXED_SMALLEST_RANGE, FIXED_LARGEST_RANGE = 2.0 ** -100, 1e30
FIXED_MOST_BITS = 24  # a code and its sums stay exact in float32's 24-bit significand


class Quantizer:
    keys = ()  # the config keys a quantizer reads

    def __init__(self, conf):
        pass


class Float32(Quantizer):
    name, wire_id = "none", 0
    help = "f32 values, exact (4 bytes each)"
    dtype, wire_dtype = torch.float32, "<f4"
    value_bits = 32  # the least each kept value takes, which bounds how many a payload's length can claim

    def encode(self, kept, one_group, rounding_seed):
        rounded = [values.to(self.dtype) for values in kept]
        return flat_bytes(rounded, self.wire_dtype), [values.float() for values in rounded]

    @classmethod
    def decode(cls, reader, counts, method):
        return split(torch.from_numpy(reader.array(cls.wire_dtype, sum(counts)).astype(np.float32)), counts)


class Float16(Float32):
    name, wire_id = "f16", 1
    help = "half-precision values (2 bytes each; beyond +-65504 they become Inf and the upload is rejected)"
    dtype, wire_dtype = torch.float16, "<f2"
    value_bits = 16


class Int8(Quantizer):
    name, wire_id = "int8", 2
    help = "per tensor, scale = max|value| / 127 and each value rounded to the nearest multiple (1 byte each)"
    value_bits = 8

    def encode(self, kept, one_group, rounding_seed):
        scales = [values.abs().max().float() / 127 if len(values) else None for values in kept]
        codes = [(values.float() / scale).round().clamp(-127, 127).to(torch.int8) if scale else
                 torch.zeros(len(values), dtype=torch.int8, device=values.device)
                 for values, scale in zip(kept, scales)]
        scales = [float(scale) for scale in scales if scale is not None]
        payload = np.array(scales, dtype=SCALE_DTYPE).tobytes() + flat_bytes(codes, "<i1")
        return payload, Int8.dequantize(codes, scales)

    @staticmethod
    def dequantize(codes, scales):
        """codes * their tensor's scale, in float32: the client's reconstruction and the server's are the same."""
        scale_of = iter(scales)
        return [c.float() * torch.tensor(next(scale_of), dtype=torch.float32, device=c.device) if len(c) else
                c.float() for c in codes]

    @staticmethod
    def decode(reader, counts, method):
        scales = read_scales(reader, sum(1 for count in counts if count))
        codes = torch.from_numpy(reader.array("<i1", sum(counts)).copy())
        if (codes == -128).any():
            raise PayloadError("int8 code -128 is outside the symmetric range")
        return Int8.dequantize(split(codes, counts), scales.tolist())


class Sign(Quantizer):
    name, wire_id = "sign", 3
    help = "one sign bit per value times the tensor's mean |value| (scaled sign, as in error-feedback signSGD)"
    shares_magnitude = False
    value_bits = 1

    def encode(self, kept, one_group, rounding_seed):
        one_group = one_group and self.shares_magnitude and any(len(values) for values in kept)
        groups = [torch.cat(kept)] if one_group else [values for values in kept if len(values)]
        magnitudes = [float(group.abs().float().mean()) for group in groups]
        negative = [values < 0 for values in kept]
        head = bytes([one_group]) if self.shares_magnitude else b""
        payload = head + np.array(magnitudes, dtype=SCALE_DTYPE).tobytes() + pack_bits(negative)
        return payload, signed_magnitudes(negative, magnitudes, one_group)

    @classmethod
    def decode(cls, reader, counts, method):
        one_group = False
        if cls.shares_magnitude:
            (one_group,) = reader.unpack(struct.Struct("<B"))
            if one_group > 1:
                raise PayloadError(f"ternary groups flag {one_group} is not 0 or 1")
        magnitudes = read_scales(reader, 1 if one_group else sum(1 for count in counts if count))
        negative = split(unpack_bits(reader, sum(counts)), counts)
        return signed_magnitudes(negative, magnitudes.tolist(), one_group)


class Ternary(Sign):
    name, wire_id = "ternary", 4
    help = ("STC's ternary values: one sign bit per kept value times one magnitude, the mean |kept value| of the "
            "whole selection under `topk_scope: model`, else of each tensor")
    shares_magnitude = True


class QSGD(Quantizer):
    name, wire_id, keys = "qsgd", 5, ("levels", "bucket_size")
    help = ("QSGD (Alistarh et al. 2017): per bucket of `bucket_size` values a f32 norm, and each value's "
            "|value| / norm * `levels` rounded up or down at random (unbiased), Elias-gamma coded, with a sign bit")
    value_bits = 1  # a level of 0: one bit of Elias-gamma code and no sign bit

    def __init__(self, conf):
        self.levels, self.bucket_size = conf["levels"], conf["bucket_size"]

    def encode(self, kept, one_group, rounding_seed):
        counts = [len(values) for values in kept]
        values = np.concatenate([v.detach().cpu().numpy().astype(np.float64) for v in kept] or [np.zeros(0)])
        starts = bucket_starts(counts, self.bucket_size)
        norms = (np.sqrt(np.add.reduceat(values ** 2, starts)) if len(starts) else np.zeros(0)).astype(SCALE_DTYPE)
        # in f64, from the f32 norm that travels: E[level] = scaled, so the reconstruction is unbiased
        per_norm = np.divide(self.levels, norms.astype(np.float64), out=np.zeros(len(norms)), where=norms > 0)
        scaled = np.abs(values, out=values)
        scaled *= np.repeat(per_norm, np.diff(starts, append=len(values)))
        floor = np.floor(scaled)
        scaled -= floor  # now the fractional part: the probability of rounding up
        generator = torch.Generator().manual_seed(rounding_seed)
        levels = floor.astype(np.int64)
        levels += torch.rand(len(values), generator=generator, dtype=torch.float64).numpy() < scaled
        np.minimum(levels, self.levels, out=levels)  # f32 norms can round below |value|
        negative = np.concatenate([v.detach().cpu().numpy() < 0 for v in kept] or [np.zeros(0, dtype=bool)])
        negative &= levels > 0
        payload = (QSGD_HEADER.pack(self.levels, self.bucket_size) + norms.tobytes()
                   + gamma_encode(levels + 1) + np.packbits(negative[levels > 0]).tobytes())
        dequantized = qsgd_values(norms, starts, levels, negative, self.levels)
        return payload, [v.to(original.device) for v, original in zip(split(dequantized, counts), kept)]

    @staticmethod
    def decode(reader, counts, method):
        levels, bucket_size = reader.unpack(QSGD_HEADER)
        if levels < 1 or bucket_size < 1:
            raise PayloadError(f"QSGD levels {levels} or bucket size {bucket_size} below 1")
        expect(method, "levels", levels, "QSGD levels")
        expect(method, "bucket_size", bucket_size, "QSGD bucket size")
        # a f32 norm per bucket and a bit of Elias-gamma code per level, at least: checked before the buckets' starts
        # are made, 8 bytes per bucket (buckets of 1 would otherwise make 16 bytes per claimed value first)
        buckets = sum(-(-count // bucket_size) for count in counts)
        reader.require_bits(32 * buckets + sum(counts), f"{buckets} QSGD norms and {sum(counts)} levels")
        starts = bucket_starts(counts, bucket_size)
        norms = read_scales(reader, len(starts))
        level_of = gamma_decode(reader, sum(counts), levels + 1)
        level_of -= 1
        negative = np.zeros(len(level_of), dtype=bool)
        negative[level_of > 0] = unpack_bits(reader, int(np.count_nonzero(level_of))).numpy()
        return split(qsgd_values(norms, starts, level_of, negative, levels), counts)


class Fixed(Quantizer):
    name, wire_id, keys = "fixed", 6, ("fixed_bits", "fixed_range")
    help = ("fixed point, one scale for every client: each value clipped to +-`fixed_range` and written as a "
            "`fixed_bits`-bit integer times a step, the power of two at or above fixed_range / (2^(fixed_bits-1) - 1) "
            "(so that sums of any number of uploads are exact; what secure aggregation sums)")
    value_bits = 2  # the fewest bits fixed_bits allows

    def __init__(self, conf):
        self.bits, self.range = conf["fixed_bits"], conf["fixed_range"]

    def encode(self, kept, one_group, rounding_seed):
        step, largest = fixed_step(self.range, self.bits), 2 ** (self.bits - 1) - 1
        # a diverged client's NaN or Inf becomes 0 or the range's end: on the grid, as the receiver will read it
        codes = [(torch.nan_to_num(values.float(), nan=0.0).clamp(-self.range, self.range) / step).round()
                 .to(torch.int64) for values in kept]
        flat = torch.cat(codes).cpu().numpy() + largest if codes else np.zeros(0, dtype=np.int64)  # offset binary
        shifts = np.arange(self.bits - 1, -1, -1)
        chunk = 8 * FIELD_CHUNK  # values a pass: a multiple of 8, so that each pass packs whole bytes
        packed = [np.packbits(((flat[start:start + chunk, None] >> shifts) & 1).astype(np.uint8).ravel())
                  for start in range(0, len(flat), chunk)]
        payload = FIXED_HEADER.pack(self.bits, self.range) + b"".join(p.tobytes() for p in packed)
        return payload, [code.float() * step for code in codes]

    @staticmethod
    def decode(reader, counts, method):
        bits, value_range = reader.unpack(FIXED_HEADER)
        if not 2 <= bits <= FIXED_MOST_BITS or not FIXED_SMALLEST_RANGE <= value_range <= FIXED_LARGEST_RANGE:
            raise PayloadError(f"fixed point of {bits} bits over +-{value_range} is not one fedsparse writes")
        expect(method, "fixed_bits", bits, "fixed-point bits")
        expect(method, "fixed_range", value_range, "fixed-point range")
        total, largest = sum(counts), 2 ** (bits - 1) - 1
        data = reader.array(np.uint8, math.ceil(total * bits / 8))
        check_padding(data, total * bits, "fixed-point values")
        codes = read_bits(data, total, bits)
        if total and codes.max() > 2 * largest:
            raise PayloadError(f"a fixed-point code above {2 * largest}, outside the symmetric range")
        codes -= largest
        return split(torch.from_numpy(codes).float() * fixed_step(value_range, bits), counts)


def fixed_step(value_range, bits):
    """The fixed-point step: the power of two at or above value_range / (2^(bits-1) - 1). A power of two makes every
    value, and every sum of them times whole example counts, exact in float32 and float64."""
    return 2.0 ** math.ceil(math.log2(value_range / (2 ** (bits - 1) - 1)))


def bucket_starts(counts, bucket_size):
    """Where each bucket begins among the values of all tensors, concatenated: a tensor's values are cut into buckets of
    `bucket_size` (its last one shorter), so that no bucket mixes tensors of different scales."""
    offsets = np.cumsum([0] + counts[:-1])
    return np.concatenate([offset + np.arange(0, count, bucket_size) for offset, count in zip(offsets, counts)]
                          or [np.zeros(0, dtype=np.int64)]).astype(np.int64)


def qsgd_values(norms, starts, levels, negative, s):
    """norm * level / s with the value's sign, in f32, computed the same way by the client and the server."""
    values = levels.astype(np.float32)
    values /= np.float32(s)
    values *= np.repeat(np.asarray(norms, dtype=np.float32), np.diff(starts, append=len(levels)))  # each one's norm
    np.negative(values, out=values, where=negative)
    return torch.from_numpy(values)


def gamma_encode(integers):
    """Elias-gamma codes of `integers` (>= 1) in two streams (see the layout): an n-bit integer is n - 1 zeros and a
    one in the first, its n - 1 bits after the leading one in the second."""
    widths = np.zeros(len(integers), dtype=np.int64)  # bit length - 1: a pass per bit of the largest
    for bit in range(1, int(integers.max()).bit_length() if len(integers) else 0):
        widths += integers >> bit > 0
    ends = np.cumsum(widths + 1) - 1
    lengths = np.zeros(ends[-1] + 1 if len(ends) else 0, dtype=np.uint8)
    lengths[ends] = 1
    long = np.flatnonzero(widths)  # integers above 1, the few that have a tail when levels are small
    tail_starts = (np.cumsum(widths) - widths)[long]  # where each tail begins in its stream
    integers, widths = integers[long], widths[long]
    tails = np.zeros(int(widths.sum()), dtype=np.uint8)
    for bit in range(int(widths.max()) if len(widths) else 0):  # the tails' bits, most significant first
        has = widths > bit
        tails[tail_starts[has] + bit] = (integers[has] >> (widths[has] - 1 - bit)) & 1
    return np.packbits(lengths).tobytes() + np.packbits(tails).tobytes()


def gamma_decode(reader, count, largest):
    """`count` Elias-gamma coded integers (int32: `largest` is at most 2^17), each refused above `largest`; the
    lengths of codes of integers up to `largest` are below its bit length."""
    most_bits = largest.bit_length()
    widths = read_unary(reader, count, most_bits - 1, count * most_bits, "Elias-gamma lengths")
    tail_bits = int(widths.sum(dtype=np.int64))
    tails = reader.array(np.uint8, math.ceil(tail_bits / 8))
    check_padding(tails, tail_bits, "Elias-gamma tails")
    padded, tails_read = padded_bytes(tails), 0
    integers = np.ones(count, dtype=np.int32)
    for start in range(0, count, FIELD_CHUNK):  # integers above 1 have a tail: the few, when levels are small
        long = np.flatnonzero(widths[start:start + FIELD_CHUNK])
        long_widths = widths[start + long].astype(np.uint64)
        first_bits = np.cumsum(long_widths) - long_widths + np.uint64(tails_read)
        integers[start + long] = read_fields(padded, first_bits, long_widths) | (1 << long_widths.astype(np.int64))
        tails_read += int(long_widths.sum())
    if count and integers.max() > largest:
        raise PayloadError(f"an Elias-gamma coded integer above {largest}")
    return integers


def signed_magnitudes(negative, magnitudes, one_group):
    """Per tensor, -m where the sign bit is set and +m elsewhere, m its group's magnitude (as float32)."""
    magnitude_of = iter(magnitudes)
    shared = next(magnitude_of) if one_group and magnitudes else None
    out = []
    for bits in negative:
        magnitude = shared if one_group else (next(magnitude_of) if len(bits) else 0.0)
        m = torch.tensor(magnitude, dtype=torch.float32, device=bits.device)
        out.append(torch.where(bits, -m, m))
    return out


QUANTIZERS = {cls.name: cls for cls in (Float32, Float16, Int8, Sign, Ternary, QSGD, Fixed)}
