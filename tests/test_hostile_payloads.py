"""Hostile uploads built by hand from the layout codec.py documents, never by the encoder: claimed counts, parameters
and lengths at their limits are refused with PayloadError, and decoding one takes memory within a small multiple of
the payload's length and the model's size."""
import math
import struct
import tracemalloc

import numpy as np
import pytest

import codec

HEADER = struct.Struct("<BBBII")  # version, sparsifier id, quantizer id, num_samples, num_tensors
TOTAL = 1000  # entries of the small model most cases claim against; its largest Rice parameter is 10 bits
LARGE = 2**21  # entries of the model the memory cases claim against (a numels list, no model): 22-bit parameter
REMAINDERS_AT = HEADER.size + 5 + 1  # after the header, coding u8 and count u32, and the Rice parameter u8


def header(sparsifier, quantizer=codec.Float32, num_tensors=1):
    return HEADER.pack(codec.VERSION, sparsifier.wire_id, quantizer.wire_id, 1, num_tensors)


def topk(coding, count, coded, quantizer=codec.Float32):
    return header(codec.TopK, quantizer) + struct.pack("<BI", coding, count) + coded


def golomb_claim(total, remainder_byte=0, quantizer=codec.Float32, values=b""):
    """Every position of the model claimed with the largest Rice parameter the decoder accepts: remainders of all
    `remainder_byte` bytes, unary quotients of 0 (a one bit each), then `values`."""
    b = total.bit_length()
    remainders = bytes([remainder_byte]) * math.ceil(total * b / 8)
    quotients = np.packbits(np.ones(total, dtype=np.uint8)).tobytes()
    return topk(codec.GOLOMB, total, bytes([b]) + remainders + quotients, quantizer) + values


def f32(count):
    return struct.pack(f"<{count}f", *[1.0] * count)


CASES = {
    "more tensors than the model": HEADER.pack(codec.VERSION, 0, 0, 1, 2**32 - 1) + f32(TOTAL),
    "random mask density NaN": header(codec.RandomMask) + struct.pack("<Qd", 1, math.nan) + f32(TOTAL),
    "random mask density above 1": header(codec.RandomMask) + struct.pack("<Qd", 1, 1.0000001) + f32(TOTAL),
    "random mask header cut short": header(codec.RandomMask) + struct.pack("<Q", 2**64 - 1),
    "count one above the model": topk(codec.INDEX_U16, TOTAL + 1, np.arange(TOTAL + 1, dtype="<u2").tobytes()),
    "count 2**32 - 1 in a bitmap": topk(codec.BITMAP, 2**32 - 1, bytes([255]) * math.ceil(TOTAL / 8)),
    "index list claiming every entry, 10 present": topk(codec.INDEX_U16, TOTAL, np.arange(10, dtype="<u2")
                                                        .tobytes()) + f32(10),
    "index list claiming every entry, no values": topk(codec.INDEX_U16, TOTAL, np.arange(TOTAL, dtype="<u2")
                                                       .tobytes()),
    "bitmap one byte short": topk(codec.BITMAP, 8, bytes([255]) + bytes(math.ceil(TOTAL / 8) - 2)) + f32(8),
    "bitmap one byte long": topk(codec.BITMAP, 8, bytes([255]) + bytes(math.ceil(TOTAL / 8))) + f32(8),
    "Rice parameter one above the largest": topk(codec.GOLOMB, 1, bytes([TOTAL.bit_length() + 1, 0, 0, 128]))
    + f32(1),
    "Rice parameter 255": topk(codec.GOLOMB, 1, bytes([255]) + bytes(32) + bytes([128])) + f32(1),
    "largest Rice parameter, remainders cut in half": golomb_claim(TOTAL)[:REMAINDERS_AT + TOTAL * 10 // 16],
    "largest Rice parameter, no quotients": golomb_claim(TOTAL)[:REMAINDERS_AT + TOTAL * 10 // 8],
    "largest Rice parameter, quotients one short": golomb_claim(TOTAL)[:-1] + bytes([254]) + f32(TOTAL),
    "every position claimed, no values": golomb_claim(TOTAL),
    "dense f32 values one byte short": header(codec.Dense) + f32(TOTAL)[:-1],
    "int8 scale cut short": header(codec.Dense, codec.Int8) + struct.pack("<f", 1.0)[:2],
    "int8 scale without codes": header(codec.Dense, codec.Int8) + struct.pack("<f", 1.0),
    "sign bits one byte short": header(codec.Dense, codec.Sign) + struct.pack("<f", 1.0) + bytes(TOTAL // 8 - 1),
    "ternary groups flag only": header(codec.Dense, codec.Ternary) + bytes([1]),
    "ternary one magnitude, no sign bits": header(codec.Dense, codec.Ternary) + bytes([1]) + struct.pack("<f", 1.0),
}


@pytest.mark.parametrize("payload", CASES.values(), ids=CASES.keys())
def test_hostile_payloads_are_refused(payload):
    with pytest.raises(codec.PayloadError):
        codec.decode(payload, [TOTAL])


def test_the_hand_built_layout_is_the_decoders():
    """The builders above write what the decoder reads: honest versions of the hostile cases decode."""
    assert codec.decode(topk(codec.INDEX_U16, 2, np.array([3, 999], dtype="<u2").tobytes()) + f32(2),
                        [TOTAL])[1][0].tolist() == [3, 999]
    _, positions, values = codec.decode(golomb_claim(TOTAL, values=f32(TOTAL)), [TOTAL])
    assert positions[0].tolist() == list(range(TOTAL)) and values[0].tolist() == [1.0] * TOTAL
    magnitude, signs = struct.pack("<f", 0.5), bytes([255]) * (TOTAL // 8)
    assert codec.decode(header(codec.Dense, codec.Sign) + magnitude + signs, [TOTAL])[2][0].tolist() == [-0.5] * TOTAL


@pytest.mark.parametrize("payload", [
    golomb_claim(LARGE),  # positions complete, cut short before their values
    # remainders of all ones: gaps of 2**22 - 1 run past the model, found only once every position is decoded
    golomb_claim(LARGE, 255, codec.Sign, struct.pack("<f", 1.0) + bytes(LARGE // 8)),
    topk(codec.INDEX_U32, LARGE, np.arange(LARGE, dtype="<u4").tobytes()),  # every index, no values
], ids=["Golomb, cut before its values", "Golomb, positions beyond the model", "index list, no values"])
def test_a_claim_on_every_position_decodes_in_bounded_memory(payload):
    """tracemalloc sees numpy's allocations, so all of the position decoding's; torch's it does not see, but none
    are made before these payloads are refused."""
    tracemalloc.start()
    try:
        with pytest.raises(codec.PayloadError):
            codec.decode(payload, [LARGE])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 4 * (len(payload) + 8 * LARGE)
