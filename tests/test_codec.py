"""codec/: every method's round trip, sizes against the documented layout, Golomb-Rice bytes worked out by hand,
quantization error bounds, and malformed payloads (fuzzed) raising PayloadError and nothing else."""
import itertools
import math
import random
import struct

import numpy as np
import pytest
import torch

import codec
import models
from conftest import dense_from

HEADER_BYTES, RANDOM_BYTES, POSITIONS_HEADER_BYTES = 11, 16, 5
SPARSIFIERS = ["none", "random", "topk"]  # the methods whose sizes the layout tests below work out
QUANTIZERS = ["none", "f16", "int8", "sign", "ternary"]
EVERY_METHOD = list(itertools.product(codec.SPARSIFIERS, codec.QUANTIZERS))  # round trips, fuzzing, runs


def cnn_shapes():
    model = models.build("cnn", (1, 16, 16), 10)
    return [t.shape for t in model.state_dict().values() if torch.is_floating_point(t)]


def cnn_numels():
    return [math.prod(shape) for shape in cnn_shapes()]


def random_diffs(numels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for n in numels]


def method(sparsifier="topk", quantize="none", prop=0.1, topk_scope="tensor"):
    return {"sparsifier": sparsifier, "quantize": quantize, "prop": prop, "topk_scope": topk_scope, "levels": 4,
            "bucket_size": 64, "topk_share": 0.5, "rank": 2, "fixed_bits": 8, "fixed_range": 0.5}


# ---- random masks ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prop", [0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_random_positions_keep_about_prop(prop):
    numels = [200_000, 50_000, 1_000]
    positions = codec.sparsifiers.random_positions(1234, prop, numels)
    for kept, numel in zip(positions, numels):
        assert kept.dtype == torch.int64
        if len(kept):
            assert kept.min() >= 0 and kept.max() < numel and torch.all(kept[1:] > kept[:-1])
        if prop in (0.0, 1.0):
            assert len(kept) == numel * prop
        else:
            assert abs(len(kept) - prop * numel) <= 4 * math.sqrt(numel * prop * (1 - prop))


def test_random_positions_depend_on_the_seed_only():
    numels = cnn_numels()
    a, b, c = (codec.sparsifiers.random_positions(seed, 0.3, numels) for seed in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_a_mask_found_again_in_its_packed_bits_is_the_mask_drawn(monkeypatch):
    numels = [200_003, 17, 5_000]  # not whole bytes of bits
    monkeypatch.setattr(codec.sparsifiers, "MASKS", codec.sparsifiers.NewestFirst(0))  # positions never kept
    monkeypatch.setattr(codec.sparsifiers, "PACKED_MASKS", codec.sparsifiers.NewestFirst(2**20))
    drawn = codec.sparsifiers.random_positions(42, 0.6, numels)
    assert codec.sparsifiers.PACKED_MASKS.used == 25_001 + 3 + 625
    unpacked = codec.sparsifiers.random_positions(42, 0.6, numels)
    generator = torch.Generator().manual_seed(42)
    for numel, first, again in zip(numels, drawn, unpacked):
        expected = (torch.rand(numel, generator=generator) < 0.6).nonzero().squeeze(1)
        assert torch.equal(first, expected) and torch.equal(again, expected)

# ---- round trips: positions exactly, values as the encoder says the receiver will see them ------------------------

@pytest.mark.parametrize("sparsifier, quantize, scope", [
    (s, q, scope) for s, q in EVERY_METHOD for scope in ("tensor", "model") if scope == "tensor" or s == "topk"])
def test_every_method_round_trips(sparsifier, quantize, scope):
    numels = cnn_numels()
    diffs = random_diffs(numels, seed=1)
    encoded = codec.encode(method(sparsifier, quantize, 0.05, scope), diffs, 750, mask_seed=99, shapes=cnn_shapes())
    num_samples, positions, values = codec.decode(encoded.payload, numels)
    assert num_samples == 750
    for got, sent, diff in zip(positions, encoded.positions, diffs):
        if sparsifier in ("none", "powersgd"):  # every entry travels, or is reconstructed from factors
            assert got is None and sent is None
        else:
            assert torch.equal(got, sent.cpu())
    for got, promised in zip(values, encoded.values):  # the client's reconstruction is the server's, bit for bit
        assert got.dtype == torch.float32 and torch.equal(got, promised)
    if quantize == "none" and sparsifier != "powersgd":  # lossless values: exactly the diff's entries
        for got, kept, diff in zip(values, positions, diffs):
            assert torch.equal(got, diff if kept is None else diff[kept])


def test_random_mask_is_regenerated_by_the_receiver():
    numels = cnn_numels()
    encoded = codec.encode(method("random", prop=0.3), random_diffs(numels), 1, mask_seed=5)
    expected = codec.sparsifiers.random_positions(5, 0.3, numels)
    assert all(torch.equal(a, b) for a, b in zip(codec.decode(encoded.payload, numels)[1], expected))


def test_decoded_diff_fits_the_state_dict():
    model = models.build("cnn", (1, 16, 16), 10)
    state = {name: t for name, t in model.state_dict().items() if torch.is_floating_point(t)}
    numels = [t.numel() for t in state.values()]
    diffs = random_diffs(numels, seed=4)
    _, positions, values = codec.decode(codec.encode(method("random", prop=0.5), diffs, 1, 5).payload, numels)
    for tensor, full, diff, kept in zip(state.values(), dense_from(positions, values, numels), diffs, positions):
        restored = full.view(tensor.shape)
        assert restored.shape == tensor.shape and restored.dtype == torch.float32
        assert torch.equal(restored.flatten()[kept], diff[kept])


# ---- sizes: the documented layout, computed independently ------------------------------------------------------

def plain_rice(positions, b):
    """Golomb-Rice code of sorted positions, written with a plain loop: (remainder bits, quotient bits) strings."""
    remainders, quotients, previous = "", "", -1
    for p in positions:
        gap = p - previous - 1
        previous = p
        remainders += format(gap % 2**b, f"0{b}b") if b else ""
        quotients += "0" * (gap // 2**b) + "1"
    return remainders, quotients


def bits_to_bytes(bits):
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def expected_positions_bytes(flat, total):
    """Smallest of bitmap, index list and Golomb-Rice, from the layout's description."""
    width = 1 if total <= 256 else 2 if total <= 65536 else 4
    remainders, quotients = plain_rice(flat, codec.positions.rice_parameter(len(flat), total)) if flat else ("", "")
    golomb = 1 + len(bits_to_bytes(remainders)) + len(bits_to_bytes(quotients))
    return POSITIONS_HEADER_BYTES + min(math.ceil(total / 8), width * len(flat), golomb)


def expected_size(sparsifier, quantize, scope, counts, total, flat):
    size = HEADER_BYTES + {"none": 0, "random": RANDOM_BYTES}.get(sparsifier, 0)
    if sparsifier == "topk":
        size += expected_positions_bytes(flat, total)
    kept, nonempty = sum(counts), sum(1 for c in counts if c)
    size += {"none": 4 * kept, "f16": 2 * kept, "int8": 4 * nonempty + kept,
             "sign": 4 * nonempty + math.ceil(kept / 8),
             "ternary": 1 + 4 * (1 if scope == "model" and sparsifier == "topk" and kept else nonempty)
             + math.ceil(kept / 8)}[quantize]
    return size


@pytest.mark.parametrize("sparsifier, quantize, scope, prop", [
    (s, q, scope, prop) for s, q in itertools.product(SPARSIFIERS, QUANTIZERS) for scope in ("tensor", "model")
    for prop in (0.0, 0.003, 0.05, 0.6, 1.0) if (scope == "tensor" or s == "topk") and (s != "none" or prop == 1.0)])
def test_payload_size_follows_the_layout(sparsifier, quantize, scope, prop):
    numels = cnn_numels()
    encoded = codec.encode(method(sparsifier, quantize, prop, scope), random_diffs(numels, 2), 3, mask_seed=11)
    counts = [n if p is None else len(p) for n, p in zip(numels, encoded.positions)]
    offsets = np.cumsum([0] + numels[:-1])
    flat = [] if sparsifier == "none" else [int(p) + int(o) for kept, o in zip(encoded.positions, offsets)
                                            for p in kept]
    assert len(encoded.payload) == expected_size(sparsifier, quantize, scope, counts, sum(numels), flat)


def test_golomb_rice_bytes_by_hand():
    # positions 3, 10, 11, 30 of 64: p = 1/16, so b = 1 + floor(log2(log(0.618) / log(15/16))) = 1 + floor(2.90) = 3
    assert codec.positions.rice_parameter(4, 64) == 3
    # gaps 3, 6, 0, 18 -> remainders 011 110 000 010, quotients 0, 0, 0, 2 -> unary 1 1 1 001
    expected = bytes([3, 0b01111000, 0b00100000, 0b11100100])
    assert codec.positions.golomb_encode(np.array([3, 10, 11, 30]), 64) == expected
    assert codec.positions.golomb_size(np.array([3, 10, 11, 30]), 64) == 4


def test_golomb_wins_when_it_is_smallest_and_its_bytes_are_as_worked_out():
    # 8 of 4096: b = 1 + floor(log2(log(0.618) / log(1 - 1/512))) = 1 + floor(7.94) = 8; gaps 100, then 511 seven times:
    # remainders 100, 255 x7 (one byte each), quotients 0, 1 x7 -> unary 1 01 01 01 01 01 01 01 (15 bits, 2 bytes).
    # 11 bytes, against 16 for u16 indices and 512 for a bitmap.
    positions = torch.tensor([100, 612, 1124, 1636, 2148, 2660, 3172, 3684])
    diff = torch.zeros(4096)
    diff[positions] = torch.arange(1.0, 9.0)
    encoded = codec.encode(method("topk", prop=8 / 4096), [diff], 1)
    assert torch.equal(encoded.positions[0].cpu(), positions)
    coded = encoded.payload[HEADER_BYTES:HEADER_BYTES + POSITIONS_HEADER_BYTES + 11]
    assert coded == (bytes([codec.positions.GOLOMB]) + struct.pack("<I", 8) + bytes([8, 100]) + bytes([255] * 7)
                     + bytes([0b10101010, 0b10101010]))
    assert len(encoded.payload) == HEADER_BYTES + POSITIONS_HEADER_BYTES + 11 + 4 * 8


@pytest.mark.parametrize("count, total", [(1, 10), (5, 1000), (100, 100_000), (3000, 10_000), (50, 51)])
def test_golomb_matches_a_plain_rice_coder(count, total):
    rng = np.random.default_rng(count)
    flat = np.sort(rng.choice(total, size=count, replace=False))
    b = codec.positions.rice_parameter(count, total)
    remainders, quotients = plain_rice(flat.tolist(), b)
    coded = codec.positions.golomb_encode(flat, total)
    assert coded == bytes([b]) + bits_to_bytes(remainders) + bits_to_bytes(quotients)
    assert codec.positions.golomb_decode(codec.wire.Reader(coded), count, total).tolist() == flat.tolist()


@pytest.mark.parametrize("total, kept, coding, position_bytes", [
    (100, [3, 17, 50, 51, 99], codec.positions.INDEX_U8, 5),  # 5 u8 indices < 13-byte bitmap, < 7-byte Golomb
    (100, list(range(0, 100, 2)), codec.positions.BITMAP, 13),  # 50 u8 indices > 13-byte bitmap
    (257, [0, 256], codec.positions.INDEX_U16, 4),  # 257 entries need u16
    # p = 1/7: b = 1 + floor(log2(0.4812 / 0.1542)) = 2; gaps 0, then 6 = 1 * 4 + 2: 2 remainder bits each, unary
    # "1" then "01" x 9999 = 19999 bits; 1 + 2500 + 2500 bytes, against 8750 for a bitmap and 40000 for u32 indices
    (70000, list(range(0, 70000, 7)), codec.positions.GOLOMB, 1 + 2500 + 2500),
    (100, [], codec.positions.INDEX_U8, 0),  # nothing kept: an empty list
])
def test_position_coding_choice(total, kept, coding, position_bytes):
    diff = torch.zeros(total)
    diff[kept] = 1.0 + torch.arange(float(len(kept)))
    encoded = codec.encode(method("topk", prop=len(kept) / total), [diff], 1)
    assert encoded.payload[HEADER_BYTES] == coding
    assert struct.unpack_from("<I", encoded.payload, HEADER_BYTES + 1)[0] == len(kept)
    assert len(encoded.payload) == HEADER_BYTES + POSITIONS_HEADER_BYTES + position_bytes + 4 * len(kept)
    assert codec.decode(encoded.payload, [total])[1][0].tolist() == kept


def test_positions_span_tensors_of_the_whole_model():
    diffs = [torch.tensor([0.0, 5.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([7.0, 0.0, 0.0, 6.0])]
    encoded = codec.encode(method("topk", prop=3 / 9, topk_scope="model"), diffs, 1)
    # flat positions 1, 5, 8 of 9: a 2-byte bitmap beats 3 u8 indices and 3 bytes of Golomb-Rice (b = 1)
    assert encoded.payload[HEADER_BYTES] == codec.positions.BITMAP
    assert encoded.payload[HEADER_BYTES + 5:HEADER_BYTES + 7] == bytes([0b01000100, 0b10000000])
    _, positions, values = codec.decode(encoded.payload, [3, 2, 4])
    assert [p.tolist() for p in positions] == [[1], [], [0, 3]]
    assert [v.tolist() for v in values] == [[5.0], [], [7.0, 6.0]]


# ---- quantizers: error bounds and the stated magnitudes --------------------------------------------------------

def test_f16_is_the_nearest_half():
    values = torch.tensor([1.0, 1 / 3, -2.5e-5, 1000.1, 0.0])
    encoded = codec.encode(method("none", "f16"), [values], 1)
    assert len(encoded.payload) == HEADER_BYTES + 2 * 5
    decoded = codec.decode(encoded.payload, [5])[2][0]
    assert decoded.tolist() == np.array([1.0, 1 / 3, -2.5e-5, 1000.1, 0.0], dtype=np.float16).astype(np.float32).tolist()


def test_int8_rounds_to_the_nearest_step_of_the_tensors_scale():
    g = torch.Generator().manual_seed(3)
    diffs = [torch.randn(1000, generator=g) * 0.01, torch.randn(50, generator=g) * 7, torch.zeros(4)]
    encoded = codec.encode(method("none", "int8"), diffs, 1)
    scales = struct.unpack_from("<3f", encoded.payload, HEADER_BYTES)  # one per tensor, read from the layout
    codes = np.frombuffer(encoded.payload, dtype=np.int8, offset=HEADER_BYTES + 12)
    assert len(codes) == 1054 and codes.min() >= -127 and codes.max() <= 127
    decoded = codec.decode(encoded.payload, [1000, 50, 4])[2]
    for diff, scale, got in zip(diffs, scales, decoded):
        assert scale == pytest.approx(float(diff.abs().max()) / 127, rel=1e-6)
        assert float((got - diff).abs().max()) <= scale / 2 * (1 + 1e-5)  # nearest rounding: half a step at most
    assert decoded[2].tolist() == [0.0] * 4 and scales[2] == 0.0


@pytest.mark.parametrize("quantize, scope", [("sign", "tensor"), ("sign", "model"), ("ternary", "tensor"),
                                             ("ternary", "model")])
def test_sign_and_ternary_decode_to_sign_times_the_stated_magnitude(quantize, scope):
    g = torch.Generator().manual_seed(4)
    diffs = [torch.randn(400, generator=g), torch.randn(100, generator=g)]
    payload = codec.encode(method("topk", quantize, prop=0.1, topk_scope=scope), diffs, 1).payload
    _, positions, values = codec.decode(payload, [400, 100])
    kept = [d[p] for d, p in zip(diffs, positions)]
    assert all(len(k) for k in kept)
    shared = quantize == "ternary" and scope == "model"
    # from the layout: [ternary's groups byte] f32 magnitudes, then the sign bits end the payload
    magnitudes_at = len(payload) - math.ceil(sum(map(len, kept)) / 8) - 4 * (1 if shared else 2)
    if quantize == "ternary":
        assert payload[magnitudes_at - 1] == int(shared)
    magnitudes = struct.unpack_from(f"<{1 if shared else 2}f", payload, magnitudes_at)
    if shared:
        assert magnitudes[0] == pytest.approx(float(torch.cat(kept).abs().mean()), rel=1e-5)
        magnitudes = magnitudes * 2
    for original, got, magnitude in zip(kept, values, magnitudes):
        if not shared:
            assert magnitude == pytest.approx(float(original.abs().mean()), rel=1e-5)
        assert torch.equal(got.abs(), torch.full_like(got, magnitude))
        assert torch.equal(got < 0, original < 0)


def test_a_model_wide_selection_with_nothing_kept_has_no_magnitude():
    encoded = codec.encode(method("topk", "ternary", prop=0.0, topk_scope="model"), [torch.ones(10)], 1)
    assert len(encoded.payload) == HEADER_BYTES + POSITIONS_HEADER_BYTES + 1
    assert codec.decode(encoded.payload, [10])[2][0].numel() == 0


# ---- malformed payloads ----------------------------------------------------------------------------------------

def sample_payloads():
    numels = [100, 300, 7]
    diffs = random_diffs(numels, seed=6)
    payloads = {}
    for s, q in EVERY_METHOD:
        for prop, scope in ((0.02, "model"), (0.5, "tensor")):
            payloads[(s, q, prop, scope)] = codec.encode(method(s, q, prop, scope), diffs, 3, 4).payload
    return numels, payloads


def test_truncated_padded_or_foreign_payloads_are_rejected():
    numels, payloads = sample_payloads()
    for key, good in payloads.items():
        codec.decode(good, numels)  # well-formed
        for cut in sorted(set(range(1, min(40, len(good)) + 1)) | set(range(1, len(good) + 1, 37))):
            with pytest.raises(codec.PayloadError):
                codec.decode(good[:-cut], numels)
        with pytest.raises(codec.PayloadError):
            codec.decode(good + b"\0", numels)
        with pytest.raises(codec.PayloadError):
            codec.decode(good, numels + [10])


def test_bad_header_fields_are_rejected():
    numels, payloads = sample_payloads()
    good = payloads[("topk", "int8", 0.02, "model")]
    for index, value in ((0, 1), (0, 3), (1, 9), (2, 9)):  # version 1 (the old format) or 3, unknown ids
        bad = bytearray(good)
        bad[index] = value
        with pytest.raises(codec.PayloadError):
            codec.decode(bytes(bad), numels)


def forged_topk(coding, count, coded, values, numel=16):
    return (struct.pack("<BBBII", codec.VERSION, codec.sparsifiers.TopK.wire_id, codec.quantizers.Float32.wire_id, 1, 1)
            + struct.pack("<BI", coding, count) + coded + struct.pack(f"<{len(values)}f", *values))


def test_bad_positions_are_rejected():
    good = forged_topk(codec.positions.INDEX_U8, 2, bytes([2, 5]), [1.0, 2.0])
    assert codec.decode(good, [16])[1][0].tolist() == [2, 5]
    assert codec.decode(forged_topk(codec.positions.BITMAP, 2, bytes([0b10000000, 0b00000001]), [1.0, 2.0]),
                        [16])[1][0].tolist() == [0, 15]
    cases = [  # (payload, the model's tensor sizes)
        (forged_topk(9, 2, bytes([2, 5]), [1.0, 2.0]), [16]),  # unknown coding
        (forged_topk(codec.positions.INDEX_U8, 2, bytes([5, 2]), [1.0, 2.0]), [16]),  # not increasing
        (forged_topk(codec.positions.INDEX_U8, 2, bytes([5, 5]), [1.0, 2.0]), [16]),  # repeated
        (forged_topk(codec.positions.INDEX_U8, 2, bytes([2, 16]), [1.0, 2.0]), [16]),  # out of range
        (forged_topk(codec.positions.INDEX_U8, 17, bytes(range(17)), [1.0] * 17), [16]),  # more positions than entries
        (forged_topk(codec.positions.BITMAP, 3, bytes([0b10000000, 0b00000001]), [1.0, 2.0, 3.0]), [16]),  # marks 2, says 3
        (forged_topk(codec.positions.BITMAP, 2, bytes([0b10000000, 0b00000001]), [1.0, 2.0]), [12]),  # marks entry 15 of 12
        (forged_topk(codec.positions.GOLOMB, 2, bytes([9, 0, 0, 0b11000000]), [1.0, 2.0]), [16]),  # b = 9 for 16 entries
        (forged_topk(codec.positions.GOLOMB, 2, bytes([2, 0b00000000, 0b00000001]), [1.0, 2.0]), [16]),  # one quotient only
        # remainders 3, 3 and quotients 3, 0: gaps 15 and 3, positions 15 and 19 of 16
        (forged_topk(codec.positions.GOLOMB, 2, bytes([2, 0b11110000, 0b00011000]), [1.0, 2.0]), [16]),
        (forged_topk(codec.positions.GOLOMB, 2, bytes([2, 0b00000001, 0b11000000]), [1.0, 2.0]), [16]),  # remainder padding
    ]
    for bad, numels in cases:
        with pytest.raises(codec.PayloadError):
            codec.decode(bad, numels)


@pytest.mark.parametrize("quantize, bad_part", [("int8", "scale"), ("int8", "code"), ("sign", "scale"),
                                                ("ternary", "flag"), ("sign", "padding")])
def test_bad_quantized_values_are_rejected(quantize, bad_part):
    payload = bytearray(codec.encode(method("none", quantize), [torch.randn(5)], 1).payload)
    if bad_part == "scale":
        payload[HEADER_BYTES:HEADER_BYTES + 4] = struct.pack("<f", float("nan"))
    elif bad_part == "code":
        payload[HEADER_BYTES + 4] = 0x80  # -128
    elif bad_part == "flag":
        payload[HEADER_BYTES] = 2
    else:
        payload[-1] |= 0b00000001  # 5 sign bits: the last 3 bits of their byte are padding
    with pytest.raises(codec.PayloadError):
        codec.decode(bytes(payload), [5])


def test_fuzzed_payloads_raise_payload_error_or_decode_cleanly():
    """Thousands of damaged uploads: each either decodes to well-formed positions and values, or raises
    PayloadError; no other exception ever escapes the decoder."""
    numels, payloads = sample_payloads()
    rng = random.Random(0)
    goods = list(payloads.values())
    for trial in range(4000):
        data = bytearray(rng.choice(goods))
        kind = trial % 4
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            data = data[:rng.randrange(len(data))]
        elif kind == 2:
            data = data[:HEADER_BYTES] + bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
        try:
            _, positions, values = codec.decode(bytes(data), numels)
        except codec.PayloadError:
            continue
        for kept, value, numel in zip(positions, values, numels):
            assert value.dtype == torch.float32 and value.dim() == 1
            if kept is None:
                assert len(value) == numel
            else:
                assert len(value) == len(kept)
                assert len(kept) == 0 or (kept.min() >= 0 and kept.max() < numel and torch.all(kept[1:] > kept[:-1]))


def test_wire_ids_are_unique():
    assert len(codec.SPARSIFIER_IDS) == len(codec.SPARSIFIERS)
    assert len(codec.QUANTIZER_IDS) == len(codec.QUANTIZERS)


@pytest.mark.parametrize("sparsifier, quantize", EVERY_METHOD)
def test_every_method_runs_from_the_command_line(write_conf, tmp_path, sparsifier, quantize):
    import main
    from conftest import read_csv
    out = tmp_path / "run"
    status = main.main(["-c", write_conf(global_epochs=1), "--out", str(out), "--set", f"sparsifier={sparsifier}",
                        "--set", f"quantize={quantize}", "--set", "topk_scope=model", "--set", "prop=0.01",
                        "--set", "error_feedback=true", "--set", "mask=round"])
    assert status == 0
    row = read_csv(out / "metrics.csv")[0]
    assert int(row["rejected"]) == 0 and int(row["refused"]) == 0
    per_value = {"none": 4, "f16": 2, "int8": 1, "sign": 1 / 8, "ternary": 1 / 8, "qsgd": 1 / 8, "fixed": 1}[quantize]
    entries = float(row["upload_fraction"]) * int(row["dense_upload_bytes"]) / 4  # of 2 uploads, ~ entries sent
    if sparsifier != "powersgd":  # which reconstructs every entry from fewer values
        assert int(row["upload_bytes"]) >= per_value * entries * 0.99  # at least the values' own bytes
    if (sparsifier, quantize) != ("none", "none"):
        assert int(row["upload_bytes"]) < int(row["dense_upload_bytes"])


@pytest.mark.parametrize("case", ["normal", "heavy tails", "tie at the boundary", "zeros past the count", "NaN",
                                  "a tenth", "a quarter"])
def test_the_largest_entries_are_the_set_torch_topk_chooses(case):
    """codec.sparsifiers.largest finds the top entries among candidates above a sampled threshold; against
    torch.topk over every entry (the plainer method), on the CNN's size, the same positions in every case, the
    fallback's included (ties at the boundary, NaN)."""
    from codec.sparsifiers import largest
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(431_080, generator=generator).abs()
    count = 17_244
    if case == "heavy tails":
        values = values ** 6
    elif case == "tie at the boundary":
        boundary = values.topk(count).values[-1]
        values[values.topk(count + 40).indices[-40:]] = boundary  # 40 more entries equal the count-th largest
    elif case == "zeros past the count":
        values[count // 2:] = 0.0  # fewer nonzero entries than asked: the rest is a tie at zero
    elif case == "NaN":
        values[[5, 70_000]] = math.nan
    elif case == "a tenth":
        count = 43_108
    elif case == "a quarter":
        count = 107_770
    expected = values.topk(count, sorted=False).indices.sort().values
    assert torch.equal(largest(values, count), expected)
