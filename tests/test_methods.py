"""The newer methods, QSGD levels and the top-k plus random hybrid: bytes and sizes worked out by hand or by plain
Python coders, QSGD's unbiasedness and variance bound, the hybrid's random part, hostile payloads for their decoders,
error feedback and one short run of each from the command line."""
import math
import struct
import tracemalloc

import numpy as np
import pytest
import torch

import codec
import main
from client import Client
from conftest import read_csv

HEADER = struct.Struct("<BBBII")  # version, sparsifier id, quantizer id, num_samples, num_tensors
QSGD_HEADER = struct.Struct("<HI")  # levels, bucket size
TOTAL = 1000


def method(sparsifier="none", quantize="qsgd", prop=0.1, levels=4, bucket_size=512, topk_share=0.5,
           topk_scope="tensor"):
    return {"sparsifier": sparsifier, "quantize": quantize, "prop": prop, "levels": levels, "bucket_size": bucket_size,
            "topk_share": topk_share, "topk_scope": topk_scope, "rank": 2}


def plain_gamma(integers):
    """Elias-gamma codes in the layout's two streams, by a plain loop: (lengths bits, tails bits) as strings."""
    lengths, tails = "", ""
    for x in integers:
        binary = format(x, "b")
        lengths += "0" * (len(binary) - 1) + "1"
        tails += binary[1:]
    return lengths, tails


def bits_to_bytes(bits):
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def plain_gamma_decode(data, count):
    """The inverse of plain_gamma over bytes, by a plain loop: (integers, bytes used)."""
    bits = "".join(format(byte, "08b") for byte in data)
    widths, at = [], 0
    for _ in range(count):
        zeros = 0
        while bits[at] == "0":
            zeros, at = zeros + 1, at + 1
        widths.append(zeros)
        at += 1
    at = math.ceil(at / 8) * 8
    integers = []
    for width in widths:
        integers.append(int("1" + bits[at:at + width], 2))
        at += width
    return integers, math.ceil(at / 8)


# ---- Elias-gamma ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("integers", [[1], [1, 1, 1], [2, 3, 4, 7, 8], [65535, 65536, 1, 5], list(range(1, 300)),
                                      []])
def test_gamma_matches_a_plain_coder(integers):
    lengths, tails = plain_gamma(integers)
    coded = codec.quantizers.gamma_encode(np.array(integers, dtype=np.int64))
    assert coded == bits_to_bytes(lengths) + bits_to_bytes(tails)
    reader = codec.wire.Reader(coded)
    assert codec.quantizers.gamma_decode(reader, len(integers), max(integers, default=1)).tolist() == integers
    assert reader.done()


def test_gamma_of_random_levels_matches_a_plain_coder():
    rng = np.random.default_rng(0)
    integers = (rng.geometric(0.3, size=5000) + rng.integers(0, 2, size=5000) * rng.integers(0, 65536, size=5000))
    integers = np.minimum(integers, 65536)
    coded = codec.quantizers.gamma_encode(integers)
    assert plain_gamma_decode(coded, len(integers)) == (integers.tolist(), len(coded))
    assert codec.quantizers.gamma_decode(codec.wire.Reader(coded), len(integers), 65536).tolist() == integers.tolist()


# ---- QSGD: bytes by hand, unbiasedness, the variance bound ---------------------------------------------------------

def test_qsgd_bytes_by_hand():
    # s = 5, buckets of 4: [3, -4, 0, 0] has norm 5, so |v| / norm * s = 3, 4, 0, 0 exactly (no rounding is random);
    # the last value is a bucket of its own, norm 0, level 0. Gamma codes of l + 1 = 4, 5, 1, 1, 1: lengths
    # 001 001 1 1 1 (9 bits, 2 bytes), tails 00 01 (1 byte); sign bits of the nonzero levels 3 and -4: 01 (1 byte).
    encoded = codec.encode(method(levels=5, bucket_size=4), [torch.tensor([3.0, -4.0, 0.0, 0.0, 0.0])], 7, 0, 123)
    expected = (HEADER.pack(codec.VERSION, codec.sparsifiers.Dense.wire_id, codec.quantizers.QSGD.wire_id, 7, 1) + QSGD_HEADER.pack(5, 4)
                + struct.pack("<2f", 5.0, 0.0) + bytes([0b00100111, 0b10000000, 0b00010000, 0b01000000]))
    assert encoded.payload == expected and len(expected) == 11 + 6 + 8 + 4
    assert codec.decode(expected, [5])[2][0].tolist() == [3.0, -4.0, 0.0, 0.0, 0.0]


def test_qsgd_sizes_follow_the_layout():
    """Per tensor ceil(count / bucket) norms; the gamma lengths and tails, and one sign bit per nonzero level, each
    padded to a byte: counted from the levels the payload decodes to (their values times s / norm)."""
    g = torch.Generator().manual_seed(1)
    diffs = [torch.randn(1000, generator=g), torch.randn(30, generator=g) * 1e-3, torch.zeros(0)]
    s, bucket = 8, 100
    encoded = codec.encode(method(levels=s, bucket_size=bucket), diffs, 1, 0, 5)
    norms_at = 11 + 6
    norms = struct.unpack_from("<11f", encoded.payload, norms_at)  # 10 buckets, then 1
    levels = []
    for t, (count, first) in enumerate(((1000, 0), (30, 10))):
        value = encoded.values[t]
        for i in range(count):
            levels.append(round(abs(float(value[i])) * s / norms[first + i // bucket]))
    lengths, tails = plain_gamma([level + 1 for level in levels])
    nonzero = sum(1 for level in levels if level)
    assert len(encoded.payload) == (norms_at + 4 * 11 + len(bits_to_bytes(lengths)) + len(bits_to_bytes(tails))
                                    + math.ceil(nonzero / 8))
    assert encoded.payload[norms_at + 44:].startswith(bits_to_bytes(lengths) + bits_to_bytes(tails))


def test_qsgd_levels_are_the_neighbours_of_the_scaled_value_and_round_trip():
    g = torch.Generator().manual_seed(2)
    diff = torch.randn(700, generator=g)
    s, bucket = 3, 64
    encoded = codec.encode(method(levels=s, bucket_size=bucket), [diff], 1, 0, 9)
    decoded = codec.decode(encoded.payload, [700])[2][0]
    assert torch.equal(decoded, encoded.values[0])
    for start in range(0, 700, bucket):
        values = [float(v) for v in diff[start:start + bucket]]
        norm = float(np.float32(math.sqrt(sum(v * v for v in values))))
        for v, got in zip(values, decoded[start:start + bucket].tolist()):
            scaled = abs(v) / norm * s
            level = got * s / norm * (1 if v >= 0 else -1)
            assert level == pytest.approx(round(level), abs=1e-4)  # a whole level, with the value's sign
            assert round(level) in (math.floor(scaled), math.ceil(scaled))


def test_qsgd_is_unbiased_within_a_bound_computed_by_hand():
    # 64 values of +-1/8: norm 1, and with s = 2 each |v| / norm * s = 1/4, so each value decodes to +-1/2 with
    # probability 1/4, else 0: mean v, standard deviation 1/2 * sqrt(1/4 * 3/4) = 0.2165. The mean of 2000
    # encodings has standard deviation 0.2165 / sqrt(2000) = 0.00484; 5 of them: 0.0242.
    signs = torch.tensor([1.0 if (i * 7) % 3 else -1.0 for i in range(64)])
    v = signs / 8
    encodings = torch.stack([codec.encode(method(levels=2, bucket_size=64), [v], 1, 0, seed).values[0]
                             for seed in range(2000)])
    assert set(encodings.abs().unique().tolist()) == {0.0, 0.5}
    assert float((encodings.mean(0) - v).abs().max()) <= 0.0242
    # the variance bound of the paper (Alistarh et al. 2017, Lemma 3.1): E|Q(v) - v|^2 <= min(n / s^2, sqrt(n) / s)
    # |v|^2 = min(16, 4) = 4; exactly, 64 * (1/2)^2 * 1/4 * 3/4 = 3, and the mean of 2000 is within 5%
    squared_errors = ((encodings - v) ** 2).sum(1)
    assert float(squared_errors.mean()) == pytest.approx(3.0, rel=0.05)
    assert float(squared_errors.mean()) <= 4.0


@pytest.mark.parametrize("levels, bucket_size", [(1, 512), (4, 512), (16, 100), (2, 10_000)])
def test_qsgd_meets_the_papers_variance_bound(levels, bucket_size):
    """On Gaussian buckets, the mean squared error of many encodings stays under min(n / s^2, sqrt(n) / s) |v|^2 per
    bucket of n values (summed over the buckets)."""
    g = torch.Generator().manual_seed(levels)
    v = torch.randn(2000, generator=g)
    bound = 0.0
    for start in range(0, 2000, bucket_size):
        n = min(bucket_size, 2000 - start)
        bound += min(n / levels ** 2, math.sqrt(n) / levels) * float((v[start:start + bucket_size] ** 2).sum())
    errors = [float(((codec.encode(method(levels=levels, bucket_size=bucket_size), [v], 1, 0, seed).values[0] - v)
                     ** 2).sum()) for seed in range(200)]
    assert sum(errors) / len(errors) <= bound


def test_qsgd_rounding_follows_its_seed_only():
    v = [torch.randn(500, generator=torch.Generator().manual_seed(3))]
    a, b, c = (codec.encode(method(), v, 1, mask_seed, rounding).payload for mask_seed, rounding in
               ((1, 10), (2, 10), (1, 11)))
    assert a == b and a != c


def test_a_client_rounds_anew_every_round_under_a_fixed_mask(make_conf):
    client = Client(1, torch.arange(10), make_conf(mask="fixed"))
    assert client.mask_seed(1) == client.mask_seed(2)
    assert client.rounding_seed(1) != client.rounding_seed(2)
    assert client.rounding_seed(1) != Client(2, torch.arange(10), make_conf(mask="fixed")).rounding_seed(1)


@pytest.mark.parametrize("sparsifier", list(codec.SPARSIFIERS))
def test_qsgd_under_every_sparsifier_round_trips(sparsifier):
    numels = [300, 50, 7]
    g = torch.Generator().manual_seed(4)
    diffs = [torch.randn(n, generator=g) for n in numels]
    encoded = codec.encode(method(sparsifier, prop=0.2, bucket_size=32), diffs, 5, 3, 4)
    _, positions, values = codec.decode(encoded.payload, numels)
    for got, sent, value, promised, diff in zip(positions, encoded.positions, values, encoded.values, diffs):
        assert (got is None) == (sent is None) and (got is None or torch.equal(got, sent.cpu()))
        assert torch.equal(value, promised)
        kept = diff if got is None else diff[got]
        assert torch.all((value == 0) | (torch.sign(value) == torch.sign(kept)))


# ---- the hybrid: top-k plus seeded random positions ---------------------------------------------------------------

def test_hybrid_is_topk_plus_a_seeded_random_part_that_costs_twelve_bytes():
    diff = torch.arange(100.0)  # top-10 of 20 (prop 0.2, share 0.5): positions 90..99
    encoded = codec.encode(method("hybrid", "none", prop=0.2), [diff], 1, 77)
    kept = encoded.positions[0].tolist()
    top, rest = [p for p in kept if p >= 90], [p for p in kept if p < 90]
    assert top == list(range(90, 100)) and len(rest) == 10
    # header, then the positions a top-10 upload codes (its payload less its 40 bytes of values), seed u64, count u32
    topk_positions = codec.encode(method("topk", "none", prop=0.1), [diff], 1).payload[11:-40]
    sparsifier_part = topk_positions + struct.pack("<QI", 77, 10)
    assert encoded.payload[11:11 + len(sparsifier_part)] == sparsifier_part
    assert len(encoded.payload) == 11 + len(sparsifier_part) + 4 * 20
    _, positions, values = codec.decode(encoded.payload, [100])
    assert positions[0].tolist() == kept and values[0].tolist() == [float(p) for p in kept]


def test_hybrid_random_part_is_uniform_over_the_others():
    # 10 of the 90 entries outside the top-10 each time: each is drawn with probability 1/9, 100 times in 900 seeds
    # on average, standard deviation sqrt(900 * 1/9 * 8/9) = 9.4; every count within 5 of them: 53 .. 147
    diff = torch.arange(100.0)
    hits = np.zeros(100, dtype=int)
    for seed in range(900):
        hits[codec.encode(method("hybrid", "none", prop=0.2), [diff], 1, seed).positions[0].numpy()] += 1
    assert hits[90:].tolist() == [900] * 10
    assert hits[:90].min() >= 53 and hits[:90].max() <= 147


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_hybrid_shares_are_topk_and_random_at_the_ends(scope):
    g = torch.Generator().manual_seed(5)
    diffs = [torch.randn(400, generator=g), torch.randn(100, generator=g)]
    all_top = codec.encode(method("hybrid", "none", prop=0.1, topk_share=1.0, topk_scope=scope), diffs, 1, 3)
    topk = codec.encode(method("topk", "none", prop=0.1, topk_scope=scope), diffs, 1)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(all_top.positions, topk.positions))
    all_random = codec.encode(method("hybrid", "none", prop=0.1, topk_share=0.0, topk_scope=scope), diffs, 1, 3)
    assert sum(len(p) for p in all_random.positions) == 50  # ceil(0.1 * 500), drawn over the whole model
    assert all_random.payload[11:16] == bytes([codec.positions.INDEX_U16]) + struct.pack("<I", 0)  # no top-k positions (of 500)


# ---- error feedback and the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("sparsifier, quantize", [("none", "qsgd"), ("hybrid", "none"), ("hybrid", "qsgd")])
def test_error_feedback_keeps_what_the_server_does_not_reconstruct(make_conf, tiny_model, sparsifier, quantize):
    conf = make_conf(sparsifier=sparsifier, quantize=quantize, prop=0.5, error_feedback=True, mask="round",
                     levels=2, bucket_size=4)
    client = Client(0, torch.arange(7), conf)
    local = torch.nn.Linear(3, 2)
    with torch.no_grad():
        local.weight.copy_(tiny_model.weight + torch.tensor([[0.3, -0.2, 0.1], [0.05, -0.6, 0.4]]))
        local.bias.copy_(tiny_model.bias + torch.tensor([0.25, -0.125]))
    diffs = [torch.tensor([0.3, -0.2, 0.1, 0.05, -0.6, 0.4]), torch.tensor([0.25, -0.125])]
    upload = client._upload(local, tiny_model.state_dict(), 1, 0.0)
    _, positions, values = codec.decode(upload.payload, [6, 2])
    for diff, kept, value, residual in zip(diffs, positions, values, client.residual):
        received = torch.zeros_like(diff)
        received[slice(None) if kept is None else kept] = value
        assert torch.allclose(received + residual, diff, atol=1e-6)


@pytest.mark.parametrize("keys", [
    {"sparsifier": "none", "quantize": "qsgd", "levels": 1},
    {"sparsifier": "hybrid", "quantize": "qsgd", "prop": 0.01, "topk_scope": "model"},
    {"sparsifier": "hybrid", "quantize": "ternary", "prop": 0.01, "topk_share": 0.25},
    {"sparsifier": "topk", "quantize": "ternary", "prop": 0.01, "download": "compressed",
     "download_sparsifier": "hybrid", "download_quantize": "qsgd", "download_prop": 0.05},
], ids=["dense qsgd", "hybrid qsgd", "hybrid ternary", "qsgd hybrid download"])
def test_runs_from_the_command_line(write_conf, tmp_path, keys):
    out = tmp_path / "run"
    assert main.main(["-c", write_conf(global_epochs=2, error_feedback=True, mask="round", **keys),
                      "--out", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    assert all(int(r["rejected"]) == 0 and int(r["refused"]) == 0 for r in rows)
    assert all(0 < int(r["upload_bytes"]) < int(r["dense_upload_bytes"]) / 8 for r in rows)


# ---- hostile payloads ----------------------------------------------------------------------------------------------

def qsgd_payload(body, sparsifier_part=b"", sparsifier=codec.sparsifiers.Dense, num_tensors=1):
    return HEADER.pack(codec.VERSION, sparsifier.wire_id, codec.quantizers.QSGD.wire_id, 1, num_tensors) + sparsifier_part + body


NORMS = struct.pack("<2f", 1.0, 1.0)  # buckets of 512: 2 for TOTAL entries
ALL_ZERO_LEVELS = bytes([255]) * (TOTAL // 8)  # a one in the lengths stream per level: gamma code of 1, level 0
HYBRID_TOP = bytes([codec.positions.INDEX_U16]) + struct.pack("<I", 2) + struct.pack("<2H", 3, 500)

CASES = {
    "QSGD levels 0": qsgd_payload(QSGD_HEADER.pack(0, 512) + NORMS + ALL_ZERO_LEVELS),
    "QSGD bucket size 0": qsgd_payload(QSGD_HEADER.pack(4, 0) + NORMS + ALL_ZERO_LEVELS),
    "QSGD header cut short": qsgd_payload(QSGD_HEADER.pack(4, 512)[:4]),
    "QSGD norms cut short": qsgd_payload(QSGD_HEADER.pack(4, 512) + NORMS[:6]),
    "QSGD norm NaN": qsgd_payload(QSGD_HEADER.pack(4, 512) + struct.pack("<2f", math.nan, 1.0) + ALL_ZERO_LEVELS),
    "QSGD no levels": qsgd_payload(QSGD_HEADER.pack(4, 512) + NORMS),
    "QSGD levels one short": qsgd_payload(QSGD_HEADER.pack(4, 512) + NORMS + ALL_ZERO_LEVELS[:-1] + bytes([254])),
    "QSGD gamma lengths all zeros": qsgd_payload(QSGD_HEADER.pack(4, 512) + NORMS + bytes(10 * TOTAL)),
    "QSGD buckets of 1, far too few bytes": qsgd_payload(QSGD_HEADER.pack(4, 1) + bytes(100)),
    # lengths: the first code has 2 bits (01), 999 one-bit codes follow; its tail bit 1 makes 3: level 2 of s = 1
    "QSGD level above s": qsgd_payload(QSGD_HEADER.pack(1, 512) + NORMS + bytes([0b01111111]) + bytes([255]) * 124
                                       + bytes([0b10000000]) + bytes([0b10000000]) + bytes([0])),
    # the first code has 3 bits (001): an integer of at least 4, where s = 1 allows 2 at most
    "QSGD gamma code longer than s allows": qsgd_payload(QSGD_HEADER.pack(1, 512) + NORMS + bytes([0b00111111])
                                                         + bytes([255]) * 124 + bytes([0b11000000, 0, 0])),
    "QSGD nonzero padding after the lengths": qsgd_payload(QSGD_HEADER.pack(4, 512) + NORMS + ALL_ZERO_LEVELS
                                                           + bytes([1])),
    "QSGD sign bits missing": qsgd_payload(QSGD_HEADER.pack(4, 512) + NORMS + bytes([0b01111111]) + bytes([255]) * 124
                                           + bytes([0b10000000]) + bytes([0])),
    "hybrid random count beyond the others": qsgd_payload(HYBRID_TOP + struct.pack("<QI", 1, TOTAL - 1),
                                                          sparsifier=codec.sparsifiers.Hybrid),
    "hybrid random count 2**32 - 1": qsgd_payload(HYBRID_TOP + struct.pack("<QI", 1, 2**32 - 1),
                                                  sparsifier=codec.sparsifiers.Hybrid),
    "hybrid seed cut short": qsgd_payload(HYBRID_TOP + struct.pack("<Q", 1)[:5], sparsifier=codec.sparsifiers.Hybrid),
    "hybrid every other entry claimed, no values": qsgd_payload(HYBRID_TOP + struct.pack("<QI", 1, TOTAL - 2),
                                                                sparsifier=codec.sparsifiers.Hybrid),
}


@pytest.mark.parametrize("payload", CASES.values(), ids=CASES.keys())
def test_hostile_payloads_are_refused(payload):
    with pytest.raises(codec.PayloadError):
        codec.decode(payload, [TOTAL])


def test_the_hand_built_qsgd_layout_is_the_decoders():
    """Honest versions of the hostile cases decode: all levels 0, then one level 1 (its sign bit set)."""
    assert codec.decode(qsgd_payload(QSGD_HEADER.pack(4, 512) + NORMS + ALL_ZERO_LEVELS), [TOTAL])[2][0].tolist() \
        == [0.0] * TOTAL
    one = qsgd_payload(QSGD_HEADER.pack(4, 512) + NORMS + bytes([0b01111111]) + bytes([255]) * 124
                       + bytes([0b10000000, 0, 0b10000000]))  # lengths end at bit 1000; tail 0: 2, level 1; sign -
    values = codec.decode(one, [TOTAL])[2][0]
    assert values[0] == -0.25 and not values[1:].any()


@pytest.mark.parametrize("payload", [
    qsgd_payload(QSGD_HEADER.pack(65535, 1) + struct.pack("<f", 1.0) * 2**21 + bytes(2**21)),
    qsgd_payload(QSGD_HEADER.pack(65535, 2**21) + struct.pack("<f", 1.0) + bytes(2**22)),
], ids=["a norm per value, gamma lengths all zeros", "one norm, gamma lengths all zeros"])
def test_hostile_qsgd_decodes_in_bounded_memory(payload):
    tracemalloc.start()
    try:
        with pytest.raises(codec.PayloadError):
            codec.decode(payload, [2**21])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 4 * (len(payload) + 8 * 2**21)
