"""Hostile uploads built by hand from the layout codec/__init__.py documents, never by the encoder: claimed counts, parameters
and lengths at their limits are refused with PayloadError, and decoding one takes memory within a small multiple of
the payload's length and the model's size."""
import math
import struct
import tracemalloc

import numpy as np
import pytest
import torch

import codec
import models
from utils import config, measure

HEADER = struct.Struct("<BBBII")  # version, sparsifier id, quantizer id, num_samples, num_tensors
TOTAL = 1000  # entries of the small model most cases claim against; its largest Rice parameter is 10 bits
LARGE = 2**21  # entries of the model the memory cases claim against (a numels list, no model): 22-bit parameter
REMAINDERS_AT = HEADER.size + 5 + 1  # after the header, coding u8 and count u32, and the Rice parameter u8


def header(sparsifier, quantizer=codec.quantizers.Float32, num_tensors=1):
    return HEADER.pack(codec.VERSION, sparsifier.wire_id, quantizer.wire_id, 1, num_tensors)


def topk(coding, count, coded, quantizer=codec.quantizers.Float32):
    return header(codec.sparsifiers.TopK, quantizer) + struct.pack("<BI", coding, count) + coded


def golomb_claim(total, remainder_byte=0, quantizer=codec.quantizers.Float32, values=b""):
    """Every position of the model claimed with the largest Rice parameter the decoder accepts: remainders of all
    `remainder_byte` bytes, unary quotients of 0 (a one bit each), then `values`."""
    b = total.bit_length()
    remainders = bytes([remainder_byte]) * math.ceil(total * b / 8)
    quotients = np.packbits(np.ones(total, dtype=np.uint8)).tobytes()
    return topk(codec.positions.GOLOMB, total, bytes([b]) + remainders + quotients, quantizer) + values


def f32(count):
    return struct.pack(f"<{count}f", *[1.0] * count)


CASES = {
    "more tensors than the model": HEADER.pack(codec.VERSION, 0, 0, 1, 2**32 - 1) + f32(TOTAL),
    "random mask density NaN": header(codec.sparsifiers.RandomMask) + struct.pack("<Qd", 1, math.nan) + f32(TOTAL),
    "random mask density above 1": header(codec.sparsifiers.RandomMask) + struct.pack("<Qd", 1, 1.0000001) + f32(TOTAL),
    "random mask header cut short": header(codec.sparsifiers.RandomMask) + struct.pack("<Q", 2**64 - 1),
    "count one above the model": topk(codec.positions.INDEX_U16, TOTAL + 1, np.arange(TOTAL + 1, dtype="<u2").tobytes()),
    "count 2**32 - 1 in a bitmap": topk(codec.positions.BITMAP, 2**32 - 1, bytes([255]) * math.ceil(TOTAL / 8)),
    "index list claiming every entry, 10 present": topk(codec.positions.INDEX_U16, TOTAL, np.arange(10, dtype="<u2")
                                                        .tobytes()) + f32(10),
    "index list claiming every entry, no values": topk(codec.positions.INDEX_U16, TOTAL, np.arange(TOTAL, dtype="<u2")
                                                       .tobytes()),
    "bitmap one byte short": topk(codec.positions.BITMAP, 8, bytes([255]) + bytes(math.ceil(TOTAL / 8) - 2)) + f32(8),
    "bitmap one byte long": topk(codec.positions.BITMAP, 8, bytes([255]) + bytes(math.ceil(TOTAL / 8))) + f32(8),
    "Rice parameter one above the largest": topk(codec.positions.GOLOMB, 1, bytes([TOTAL.bit_length() + 1, 0, 0, 128]))
    + f32(1),
    "Rice parameter 255": topk(codec.positions.GOLOMB, 1, bytes([255]) + bytes(32) + bytes([128])) + f32(1),
    "largest Rice parameter, remainders cut in half": golomb_claim(TOTAL)[:REMAINDERS_AT + TOTAL * 10 // 16],
    "largest Rice parameter, no quotients": golomb_claim(TOTAL)[:REMAINDERS_AT + TOTAL * 10 // 8],
    "largest Rice parameter, quotients one short": golomb_claim(TOTAL)[:-1] + bytes([254]) + f32(TOTAL),
    "every position claimed, no values": golomb_claim(TOTAL),
    "dense f32 values one byte short": header(codec.sparsifiers.Dense) + f32(TOTAL)[:-1],
    "int8 scale cut short": header(codec.sparsifiers.Dense, codec.quantizers.Int8) + struct.pack("<f", 1.0)[:2],
    "int8 scale without codes": header(codec.sparsifiers.Dense, codec.quantizers.Int8) + struct.pack("<f", 1.0),
    "sign bits one byte short": header(codec.sparsifiers.Dense, codec.quantizers.Sign) + struct.pack("<f", 1.0) + bytes(TOTAL // 8 - 1),
    "ternary groups flag only": header(codec.sparsifiers.Dense, codec.quantizers.Ternary) + bytes([1]),
    "ternary one magnitude, no sign bits": header(codec.sparsifiers.Dense, codec.quantizers.Ternary) + bytes([1]) + struct.pack("<f", 1.0),
}


@pytest.mark.parametrize("payload", CASES.values(), ids=CASES.keys())
def test_hostile_payloads_are_refused(payload):
    with pytest.raises(codec.PayloadError):
        codec.decode(payload, [TOTAL])


def test_the_hand_built_layout_is_the_decoders():
    """The builders above write what the decoder reads: honest versions of the hostile cases decode."""
    assert codec.decode(topk(codec.positions.INDEX_U16, 2, np.array([3, 999], dtype="<u2").tobytes()) + f32(2),
                        [TOTAL])[1][0].tolist() == [3, 999]
    _, positions, values = codec.decode(golomb_claim(TOTAL, values=f32(TOTAL)), [TOTAL])
    assert positions[0].tolist() == list(range(TOTAL)) and values[0].tolist() == [1.0] * TOTAL
    magnitude, signs = struct.pack("<f", 0.5), bytes([255]) * (TOTAL // 8)
    assert codec.decode(header(codec.sparsifiers.Dense, codec.quantizers.Sign) + magnitude + signs, [TOTAL])[2][0].tolist() == [-0.5] * TOTAL


@pytest.mark.parametrize("payload", [
    golomb_claim(LARGE),  # positions complete, cut short before their values
    # remainders of all ones: gaps of 2**22 - 1 run past the model, found only once every position is decoded
    golomb_claim(LARGE, 255, codec.quantizers.Sign, struct.pack("<f", 1.0) + bytes(LARGE // 8)),
    topk(codec.positions.INDEX_U32, LARGE, np.arange(LARGE, dtype="<u4").tobytes()),  # every index, no values
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


# ---- on a ResNet-18-sized model: the payloads that cost the server most, and a server that decodes only its method --

STC = {"sparsifier": "topk", "topk_scope": "model", "quantize": "ternary", "prop": 0.04}
QSGD_WIDEST = {"sparsifier": "none", "quantize": "qsgd", "levels": 65535}
ALL_RANDOM = {"sparsifier": "hybrid", "quantize": "sign", "prop": 1.0, "topk_share": 0.0}


@pytest.fixture(scope="module")
def resnet18_numels():
    model = models.build("resnet18", (3, 32, 32), 10)
    return [t.numel() for t in model.state_dict().values() if torch.is_floating_point(t)]


def gamma_bomb(numels, size=23_800_000):
    """Dense QSGD claiming 65535 levels, its Elias-gamma lengths stream all ones up to `size` bytes: one window over
    every bit such codes could take made 8 bytes per bit first (+1.6 GB)."""
    buckets = sum(math.ceil(n / 512) for n in numels)
    head = header(codec.sparsifiers.Dense, codec.quantizers.QSGD, len(numels)) + struct.pack("<HI", 65535, 512) + bytes(4 * buckets)
    return head + b"\xff" * (size - len(head))


def all_random_hybrid(numels):
    """A hybrid upload of no top-k positions and every entry random, each a sign bit under a magnitude of 1 per tensor
    (1.4 MB): an f64 key per entry and a top-k over all of them made +499 MB."""
    return (header(codec.sparsifiers.Hybrid, codec.quantizers.Sign, len(numels)) + struct.pack("<BIQI", codec.positions.INDEX_U32, 0, 7, sum(numels))
            + f32(len(numels)) + bytes(math.ceil(sum(numels) / 8)))


@pytest.mark.parametrize("case, run, refusal", [
    ("gamma bomb", QSGD_WIDEST, "nonzero padding after the Elias-gamma lengths"),
    ("gamma bomb", STC, "sparsifier none and quantize qsgd, where this run's are topk and ternary"),
    ("all-random hybrid", ALL_RANDOM, None),
    ("all-random hybrid cut by 10 bytes", ALL_RANDOM, "payload ends early"),
    ("all-random hybrid", STC, "sparsifier hybrid and quantize sign, where this run's are topk and ternary"),
    ("all-random hybrid", {**ALL_RANDOM, "prop": 0.5}, "11183562 random positions beside 0 top ones, where this "
                                                       "run's prop gives 5591781"),
])
def test_the_costliest_payloads_stay_within_300_mb(resnet18_numels, case, run, refusal):
    """Each decoded by a server whose run is `run`: refused, or decoded (only by a run of its own method and
    parameters), with the process's peak memory at most 300 MB above what it held before (measure.cost sees torch's
    allocations and numpy's)."""
    payload = gamma_bomb(resnet18_numels) if case == "gamma bomb" else all_random_hybrid(resnet18_numels)
    payload = payload[:-10] if "cut" in case else payload
    outcome, grown, _, _ = measure.cost(lambda: codec.decode(payload, resnet18_numels, config.validate(run)))
    assert grown <= 300e6
    if refusal:
        assert isinstance(outcome, codec.PayloadError) and refusal in str(outcome), outcome
    else:
        _, positions, values = outcome
        assert [len(p) for p in positions] == resnet18_numels and all(bool((v == 1.0).all()) for v in values)


def test_a_payload_of_another_method_is_refused_before_its_body_is_read():
    """Only the header is read: a payload cut right after it is refused for its method, not for its length."""
    for sparsifier in codec.SPARSIFIERS.values():
        for quantizer in codec.QUANTIZERS.values():
            if (sparsifier.name, quantizer.name) != (STC["sparsifier"], STC["quantize"]):
                with pytest.raises(codec.PayloadError, match="where this run's are topk and ternary"):
                    codec.decode(header(sparsifier, quantizer), [TOTAL], STC)


@pytest.mark.parametrize("run, payload, refusal", [
    ({"sparsifier": "random", "quantize": "none", "prop": 0.5},
     header(codec.sparsifiers.RandomMask) + struct.pack("<Qd", 1, 0.25), "mask density 0.25, where this run's prop is 0.5"),
    ({"sparsifier": "topk", "quantize": "none", "prop": 0.01, "topk_scope": "model"},  # keeps 10 of 1000
     topk(codec.positions.INDEX_U16, 11, np.arange(11, dtype="<u2").tobytes()) + f32(11), "11 positions, where this run's prop "
                                                                               "keeps 10"),
    ({"sparsifier": "powersgd", "quantize": "none", "rank": 1},
     header(codec.sparsifiers.PowerSGD) + struct.pack("<HI", 2, 10), "PowerSGD rank 2, where this run's rank is 1"),
    ({"sparsifier": "none", "quantize": "qsgd", "levels": 4, "bucket_size": 512},
     header(codec.sparsifiers.Dense, codec.quantizers.QSGD) + struct.pack("<HI", 8, 512), "QSGD levels 8, where this run's levels is 4"),
    ({"sparsifier": "none", "quantize": "qsgd", "levels": 4, "bucket_size": 512},
     header(codec.sparsifiers.Dense, codec.quantizers.QSGD) + struct.pack("<HI", 4, 64), "QSGD bucket size 64, where this run's bucket_size "
                                                                  "is 512"),
])
def test_parameters_on_the_wire_must_be_the_runs(run, payload, refusal):
    with pytest.raises(codec.PayloadError, match=refusal):
        codec.decode(payload, [TOTAL], run)
