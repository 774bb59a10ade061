"""PowerSGD (sparsifier powersgd): factors, reconstructions and payload sizes worked out by hand or with plain numpy
(never with the code under test), the warm start, error feedback, hostile and fuzzed payloads, and runs that resume,
replicate and start from the command line."""
import copy
import hashlib
import json
import math
import random
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
import torch

import codec
import downloads
import main
from client import Client
from server import Server
from conftest import TINY, read_csv, without_seconds
from utils import run_files

HEADER = struct.Struct("<BBBII")  # version, sparsifier id, quantizer id, num_samples, num_tensors
RANK = struct.Struct("<H")


def method(rank=1, quantize="none"):
    return {"sparsifier": "powersgd", "quantize": quantize, "rank": rank, "levels": 4, "bucket_size": 8,
            "fixed_bits": 8, "fixed_range": 4.0}


def factors(payload, rows, cols, rank, at=HEADER.size + RANK.size + 4):
    """P and Q' of a payload's one factored tensor of f32 values, read with struct from the layout."""
    values = np.array(struct.unpack_from(f"<{rank * (rows + cols)}f", payload, at), dtype=np.float64)
    return values[:rows * rank].reshape(rows, rank), values[rows * rank:].reshape(cols, rank)


# ---- the power step, by hand and against numpy's SVD --------------------------------------------------------------

def test_one_power_step_by_hand():
    # M = [[1, 2, 3], [4, 5, 6]] from the start Q = [1, 1, 0]: P = M Q = [3, 9], orthonormalized [1, 3] / sqrt(10);
    # Q' = M^T P = [1 + 12, 2 + 15, 3 + 18] / sqrt(10) = [13, 17, 21] / sqrt(10); P Q'^T = [1, 3]^T [13, 17, 21] / 10
    m = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    encoded = codec.encode(method(), [m], 5, shapes=[(2, 3)], memory=[torch.tensor([1.0, 1.0, 0.0])])
    payload = encoded.payload
    assert payload[:HEADER.size] == HEADER.pack(codec.VERSION, 4, 0, 5, 1)
    assert struct.unpack_from("<HI", payload, HEADER.size) == (1, 2)  # rank 1, 2 rows
    assert len(payload) == HEADER.size + 2 + 4 + 4 * (2 + 3)
    p, q = factors(payload, 2, 3, 1)
    sign = np.sign(p[0, 0])  # an orthonormal basis is one up to its sign
    assert sign * p[:, 0] == pytest.approx(np.array([1, 3]) / math.sqrt(10), rel=1e-6)
    assert sign * q[:, 0] == pytest.approx(np.array([13, 17, 21]) / math.sqrt(10), rel=1e-6)
    expected = [1.3, 1.7, 2.1, 3.9, 5.1, 6.3]
    _, positions, values = codec.decode(payload, [6])
    assert positions == [None] and values[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(encoded.values[0], values[0])  # the sender's reconstruction is the receiver's, bit for bit
    # the next start: Q' as sent, with a unit column, [13, 17, 21] / sqrt(13^2 + 17^2 + 21^2)
    assert encoded.memory[0].tolist() == pytest.approx((sign * np.array([13, 17, 21]) / math.sqrt(899)).tolist(),
                                                       rel=1e-6)


def test_the_reconstruction_is_the_f64_sum_of_the_f32_factors_outer_products():
    """Hand-built factors of f32 values whose products need more than 24 bits: the receiver's P Q'^T, in f32, is the
    correctly rounded sum of the rank-one terms (numpy in f64, terms added in rank order)."""
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal((11, 3)).astype(np.float32)
    payload = (HEADER.pack(codec.VERSION, 4, 0, 1, 1) + struct.pack("<HI", 3, 7) + p.astype("<f4").tobytes()
               + q.astype("<f4").tobytes())
    expected = np.zeros((7, 11))
    for k in range(3):
        expected += np.outer(p[:, k].astype(np.float64), q[:, k].astype(np.float64))
    assert codec.decode(payload, [77])[2][0].numpy().tolist() == expected.astype(np.float32).ravel().tolist()


def test_an_exactly_low_rank_matrix_is_reconstructed_after_one_step():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((20, 2)), rng.standard_normal((30, 2))
    m = a @ b.T  # rank 2
    start = rng.standard_normal((30, 2)) + 3.0  # far from orthogonal: its two columns are nearly parallel
    encoded = codec.encode(method(rank=2), [torch.tensor(m.ravel(), dtype=torch.float32)], 1, shapes=[(20, 30)],
                           memory=[torch.tensor(start.ravel(), dtype=torch.float32)])
    reconstructed = codec.decode(encoded.payload, [600])[2][0].numpy().reshape(20, 30)
    assert np.abs(reconstructed - m).max() <= 1e-5 * np.abs(m).max()


def test_the_warm_start_converges_to_the_best_rank_r_approximation():
    """Encoding the same matrix again and again, each time from the previous Q', is subspace iteration: it converges
    to the truncated SVD (Eckart-Young), here at a rate of (singular value 3 / singular value 2)^k = 4^-k."""
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    v, _ = np.linalg.qr(rng.standard_normal((40, 12)))
    m = (u * [8.0, 4.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.02, 0.01]) @ v.T
    left, singular, right = np.linalg.svd(m)
    best = (left[:, :2] * singular[:2]) @ right[:2]
    diff, memory = torch.tensor(m.ravel(), dtype=torch.float32), None
    for step in range(25):
        encoded = codec.encode(method(rank=2), [diff], 1, mask_seed=3, shapes=[(12, 40)], memory=memory)
        memory = encoded.memory
        if step == 0:
            first_error = np.abs(encoded.values[0].numpy().reshape(12, 40) - best).max()
    error = np.abs(encoded.values[0].numpy().reshape(12, 40) - best).max()
    assert error <= 1e-5 * np.abs(best).max() < first_error


# ---- the payload's size ----------------------------------------------------------------------------------------

SHAPES = [(8, 1, 3, 3), (8,), (3, 2), (4, 6)]  # a conv kernel, its bias, a matrix too small to gain, a matrix
NUMELS = [72, 8, 6, 24]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_payload_size_by_hand(quantize):
    # rank 2: the kernel is 8 x 9 and 2 * (8 + 9) = 34 < 72 values; the 3 x 2 matrix would take 2 * 5 = 10 >= 6, so it
    # travels whole, like the bias; the 4 x 6 matrix takes 2 * 10 = 20 < 24. Groups: P 16, Q' 18 | 8 | 6 | P 8, Q' 12
    g = torch.Generator().manual_seed(0)
    diffs = [torch.randn(n, generator=g) for n in NUMELS]
    payload = codec.encode(method(rank=2, quantize=quantize), diffs, 1, shapes=SHAPES).payload
    assert struct.unpack_from("<H4I", payload, HEADER.size) == (2, 8, 0, 0, 4)
    coefficients = 16 + 18 + 8 + 6 + 8 + 12
    values = 4 * coefficients if quantize == "none" else 4 * 6 + coefficients  # int8: a f32 scale per group
    assert len(payload) == HEADER.size + 2 + 4 * 4 + values
    _, positions, decoded = codec.decode(payload, NUMELS)
    assert positions == [None] * 4 and [len(v) for v in decoded] == NUMELS
    if quantize == "none":  # tensors that travel whole arrive exactly
        assert torch.equal(decoded[1], diffs[1]) and torch.equal(decoded[2], diffs[2])


def test_each_factor_has_its_own_int8_scale():
    """P is orthonormal (entries of about 1 / sqrt(rows)) and Q' carries the update's size: one scale for both would
    round P's entries to a few levels. The two scales are max |P| / 127 and max |Q'| / 127, read from the layout."""
    m = torch.outer(torch.arange(1.0, 9.0), torch.arange(1.0, 10.0)).flatten() * 1e-3
    encoded = codec.encode(method(rank=1, quantize="int8"), [m], 1, shapes=[(8, 9)])
    scale_p, scale_q = struct.unpack_from("<2f", encoded.payload, HEADER.size + 2 + 4)
    exact = codec.encode(method(rank=1), [m], 1, shapes=[(8, 9)])
    p, q = factors(exact.payload, 8, 9, 1)
    assert scale_p == pytest.approx(np.abs(p).max() / 127, rel=1e-6)
    assert scale_q == pytest.approx(np.abs(q).max() / 127, rel=1e-6)
    assert torch.allclose(encoded.values[0], m, rtol=0, atol=float(m.abs().max()) * 0.02)


# ---- the warm start and error feedback --------------------------------------------------------------------------

def test_a_zero_update_does_not_freeze_the_warm_start():
    start = torch.tensor([0.3, -1.0, 2.0])
    zero = codec.encode(method(), [torch.zeros(6)], 1, shapes=[(2, 3)], memory=[start])
    assert zero.values[0].tolist() == [0.0] * 6
    assert torch.equal(zero.memory[0], start)  # Q' = M^T P = 0 would start every later step at zero
    rank_one = torch.tensor([[1.0], [2.0]]) @ torch.tensor([[1.0, -1.0, 0.5]])
    after = codec.encode(method(), [rank_one.flatten()], 1, shapes=[(2, 3)], memory=zero.memory)
    assert torch.allclose(after.values[0], rank_one.flatten(), atol=1e-6)


def test_only_the_zero_columns_of_q_keep_their_previous_start():
    # only M's first row is nonzero: P's two columns are both multiples of e1, so one of P's orthonormal columns is
    # orthogonal to e1 and its column of Q' = M^T P is zero
    m = torch.zeros(4, 5)
    m[0] = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0])
    start = torch.arange(1.0, 11.0).view(5, 2)
    encoded = codec.encode(method(rank=2), [m.flatten()], 1, shapes=[(4, 5)], memory=[start.flatten()])
    _, q = factors(encoded.payload, 4, 5, 2)
    memory = encoded.memory[0].view(5, 2).double().numpy()
    zero_columns = [k for k in range(2) if not q[:, k].any()]
    assert len(zero_columns) == 1
    for k in range(2):  # the other column: Q''s, scaled to a unit norm
        expected = start[:, k].tolist() if k in zero_columns else (q[:, k] / np.linalg.norm(q[:, k])).tolist()
        assert memory[:, k].tolist() == pytest.approx(expected, rel=1e-6)


def test_a_diverged_round_does_not_poison_the_warm_start():
    """A round whose diff is huge but finite (a client that diverged, then trains from the server's healthy model
    again) leaves a warm start from which the next, ordinary diff still codes to finite values. Two ways it used to
    end every later upload as NaN: M of 3e37 left Q' = 6e37 (4 rows of 3e37 against P's 1/2), and the next M Q, six
    ones times 6e37, overflowed; a first column of 1e38 over 16 rows (M Q = 1e37 from a start of 0.1 there) made
    Q' = 16 * 1e38 / 4 Inf, which passed the zero-column check."""
    column = torch.zeros(16, 6).index_fill_(1, torch.tensor([0]), 1e38)
    for shape, huge, start in (((4, 6), torch.full((24,), 3e37), None),
                               ((16, 6), column.flatten(), [torch.tensor([0.1, 1, 1, 1, 1, 1])])):
        after = codec.encode(method(), [huge], 1, shapes=[shape], memory=start)
        assert torch.isfinite(after.memory[0]).all()
        following = codec.encode(method(), [torch.ones(math.prod(shape))], 1, shapes=[shape], memory=after.memory)
        assert torch.allclose(following.values[0], torch.ones(math.prod(shape)))  # rank 1: exact after one step


def test_the_payload_does_not_depend_on_where_the_warm_start_lies_in_memory():
    """A warm start decoded from a Flower node's state is a view into one buffer, at any offset; the in-process
    client's is an allocation of its own. MKL's matrix products round differently with their operands' alignment, so
    the same diff and start gave other factors on a node (Flower runs then drifted from in-process ones by an ulp a
    round)."""
    g = torch.Generator().manual_seed(4)
    diff, start = torch.randn(10 * 128, generator=g), torch.randn(128, generator=g)  # the CNN's last layer, rank 1
    payloads = set()
    for offset in range(16):  # floats: 64 bytes
        buffer = torch.zeros(offset + len(start))
        buffer[offset:] = start
        payloads.add(codec.encode(method(), [diff], 1, shapes=[(10, 128)], memory=[buffer[offset:]]).payload)
    assert len(payloads) == 1


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_error_feedback_keeps_the_diff_minus_the_reconstruction(make_conf, quantize):
    conf = make_conf(sparsifier="powersgd", rank=1, quantize=quantize, error_feedback=True)
    client = Client(0, torch.arange(7), conf)
    model = torch.nn.Linear(6, 4)  # weight 4 x 6: 1 * (4 + 6) < 24 values, factored; bias whole
    g = torch.Generator().manual_seed(5)
    local = torch.nn.Linear(6, 4)
    with torch.no_grad():
        local.weight.copy_(model.weight + torch.randn(4, 6, generator=g))
        local.bias.copy_(model.bias + torch.randn(4, generator=g))
    diffs = [(local.weight - model.weight).detach().flatten(), (local.bias - model.bias).detach()]
    upload = client._upload(local, model.state_dict(), 1, 0.0)
    _, positions, values = codec.decode(upload.payload, [24, 4])
    assert positions == [None, None]
    reconstructed = values[0].double().numpy().reshape(4, 6)
    assert np.linalg.matrix_rank(reconstructed, tol=1e-5) == 1
    for diff, value, residual in zip(diffs, values, client.residual):
        assert torch.allclose(value + residual, diff, atol=1e-6)
    assert client.residual[0].abs().max() > 0.1  # a random 4 x 6 matrix is far from rank 1
    # the next upload codes the same diff plus that residual, and keeps what its reconstruction misses of both
    old_residual = [r.clone() for r in client.residual]
    values = codec.decode(client._upload(local, model.state_dict(), 2, 0.0).payload, [24, 4])[2]
    for diff, old, value, residual in zip(diffs, old_residual, values, client.residual):
        assert torch.allclose(value + residual, diff + old, atol=1e-6)


def test_an_attacker_advances_its_warm_start_once(make_conf):
    """An attacker encodes its honest diff, which advances its warm start, then its attacked diff from the warm start
    it had before: its memory stays an honest client's."""
    settings = dict(sparsifier="powersgd", rank=1, error_feedback=True)
    attacker = Client(0, torch.arange(7), make_conf(**settings, attackers=1))
    honest = Client(0, torch.arange(7), make_conf(**settings))
    model = torch.nn.Linear(6, 4)
    for round_index in (1, 2, 3):
        local = torch.nn.Linear(6, 4)
        with torch.no_grad():
            local.weight.copy_(model.weight + torch.randn(4, 6, generator=torch.Generator().manual_seed(round_index)))
            local.bias.copy_(model.bias)
        payloads = [client._upload(local, model.state_dict(), round_index, 0.0).payload for client in (attacker, honest)]
        assert all(torch.equal(a, h) for a, h in zip(attacker.memory, honest.memory))
        assert all(torch.equal(a, h) for a, h in zip(attacker.residual, honest.residual))
        boosted, sent = (codec.decode(p, [24, 4])[2][0] for p in payloads)
        assert torch.allclose(boosted, 100 * sent, rtol=1e-4, atol=1e-5)  # the same factors, Q' 100 times larger


def test_a_channels_last_conv_and_batchnorm_arrive_where_they_belong(make_conf):
    """Models are channels-last: a conv kernel's entries lie (out, kh, kw, in) in memory, but its diff travels as the
    logical (out, in * kh * kw) matrix on both sides. Each weight's diff here is rank 1 in that logical layout
    (u v^T, built by hand), so one rank-1 power step reconstructs it; the server's model must move by it entry for
    entry. BatchNorm's weight, bias and running statistics are vectors and travel whole, exactly; its batch count is
    not a float and does not travel."""
    conf = make_conf(sparsifier="powersgd", rank=1, aggregation="mean")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 5)).to(memory_format=torch.channels_last)
    server = Server(model, conf, torch.device("cpu"))
    before = {name: value.clone() for name, value in server.global_state().items()}
    g = torch.Generator().manual_seed(11)
    expected = {}
    for name, value in before.items():
        if not torch.is_floating_point(value):
            continue
        if value.dim() >= 2:
            u, v = torch.randn(value.shape[0], generator=g), torch.randn(value[0].numel(), generator=g)
            expected[name] = torch.outer(u, v).view(value.shape) * 1e-2
        else:
            expected[name] = torch.randn(value.shape, generator=g) * 1e-2
    local = copy.deepcopy(server.model)
    with torch.no_grad():
        for name, value in local.state_dict().items():
            if name in expected:
                value.add_(expected[name])
    assert local.state_dict()["0.weight"].is_contiguous(memory_format=torch.channels_last)
    upload = Client(0, torch.arange(7), conf)._upload(local, before, 1, 0.0)
    assert server.receive(upload.payload, 0) is None and server.aggregate(1) is None
    after = server.global_state()
    for name, diff in expected.items():
        moved = after[name] - before[name]
        if diff.dim() >= 2:
            assert torch.allclose(moved, diff, rtol=0, atol=1e-5 * float(diff.abs().max())), name
        else:  # whole, as f32 values: the server adds exactly the client's diff
            assert torch.equal(after[name], before[name] + (local.state_dict()[name] - before[name])), name
    assert torch.equal(after["1.num_batches_tracked"], before["1.num_batches_tracked"])


# ---- hostile payloads, built by hand from the layout -------------------------------------------------------------

TOTAL = 1000  # one tensor of 1000 entries: 10 rows of 100 is a matrix the layout allows
LARGE = 2**21  # the memory cases' model: 2**10 rows of 2**11


def payload(rank, rows, values=b"", quantizer=codec.quantizers.Float32, num_tensors=1):
    return (HEADER.pack(codec.VERSION, codec.sparsifiers.PowerSGD.wire_id, quantizer.wire_id, 1, num_tensors) + RANK.pack(rank)
            + struct.pack(f"<{len(rows)}I", *rows) + values)


def f32(count):
    return struct.pack(f"<{count}f", *[1.0] * count)


CASES = {
    "rank 0": payload(0, [10], f32(0)),
    "rank 0 with values": payload(0, [10], f32(110)),
    "rank above the matrix's": payload(11, [10], f32(11 * 110)),
    "rows not dividing the tensor": payload(1, [7], f32(7 + 143)),
    "rows beyond the tensor": payload(1, [2000], f32(2000 + 1)),
    "rank 2 of a 1000 x 1 matrix": payload(2, [1000], f32(2002)),
    "coefficients one short": payload(1, [10], f32(109)),
    "coefficients one long": payload(1, [10], f32(111)),
    "a byte after the coefficients": payload(1, [10], f32(110) + b"\0"),
    "whole tensor one short": payload(1, [0], f32(999)),
    "rank cut short": payload(1, [])[:HEADER.size + 1],
    "rows cut short": payload(1, [])[:HEADER.size + 2] + bytes(3),
    "count beyond the bytes": payload(10, [10], f32(100)),
}


@pytest.mark.parametrize("data", CASES.values(), ids=CASES.keys())
def test_hostile_payloads_are_refused(data):
    with pytest.raises(codec.PayloadError):
        codec.decode(data, [TOTAL])


def test_the_hand_built_layout_is_the_decoders():
    """Honest versions of the hostile cases decode: P all ones (10 x 1) and Q' all twos (100 x 1) give 2 everywhere;
    a 1000 x 1 matrix of rank 1; a tensor that travels whole."""
    assert codec.decode(payload(1, [10], f32(10) + struct.pack("<100f", *[2.0] * 100)), [TOTAL])[2][0].tolist() \
        == [2.0] * TOTAL
    assert codec.decode(payload(1, [1000], f32(1001)), [TOTAL])[2][0].tolist() == [1.0] * TOTAL
    assert codec.decode(payload(1, [0], f32(1000)), [TOTAL])[2][0].tolist() == [1.0] * TOTAL


@pytest.mark.parametrize("data", [
    payload(1024, [1024], f32(1000)),  # rank 1024 of 1024 x 2048: 3 * 2**20 coefficients claimed
    payload(1024, [1024], bytes(1000), codec.quantizers.Sign),  # a bit each: still 384 kB claimed
    payload(1024, [1024], struct.pack("<HI", 4, 1) + bytes(1000), codec.quantizers.QSGD),  # a norm per coefficient
    payload(1, [2**21], f32(100)),  # a 2**21 x 1 matrix: rows the size of the model
    # rank 8: 24576 coefficients, a bit each present, but not their 24576 norms (96 kB)
    payload(8, [1024], struct.pack("<HI", 4, 1) + bytes(3072 + 8), codec.quantizers.QSGD),
], ids=["f32", "sign", "qsgd buckets of 1", "one column", "qsgd levels present, norms not"])
def test_a_claim_beyond_the_bytes_is_refused_in_bounded_memory(data):
    tracemalloc.start()
    try:
        with pytest.raises(codec.PayloadError):
            codec.decode(data, [LARGE])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 4 * (len(data) + 8 * 1024)


def test_a_rank_above_the_receivers_is_refused_before_any_reconstruction():
    """Reconstructing rank-r factors costs r multiply-adds per entry: a payload of sign-coded rank-1024 factors of a
    1024 x 2048 matrix (384 kB, every byte present) would cost 2**31, 512 times an honest rank-2 upload's. With the
    receiver's rank it is refused from its header; the same factors at that rank decode."""
    run = {"sparsifier": "powersgd", "quantize": "sign", "rank": 2}
    signs = bytes(math.ceil(1024 * 3072 / 8))
    hostile = payload(1024, [1024], struct.pack("<2f", 1.0, 1.0) + signs, codec.quantizers.Sign)
    assert len(codec.decode(hostile, [LARGE])[2][0]) == LARGE  # well formed: only the rank bound refuses it
    with pytest.raises(codec.PayloadError, match="PowerSGD rank 1024, where this run's rank is 2"):
        codec.decode(hostile, [LARGE], run)
    honest = payload(2, [1024], struct.pack("<2f", 1.0, 1.0) + bytes(2 * 3072 // 8), codec.quantizers.Sign)
    assert codec.decode(honest, [LARGE], run)[2][0].tolist() == [2.0] * LARGE  # (+1)(+1) + (+1)(+1)


def test_the_server_refuses_ranks_above_its_own(make_conf, tiny_model):
    """The server's bound is its config's rank: nn.Linear(3, 2)'s 2 x 3 weight at rank 2 is refused under rank 1 and
    accepted under rank 2."""
    rank_two = (HEADER.pack(codec.VERSION, codec.sparsifiers.PowerSGD.wire_id, 0, 1, 2) + RANK.pack(2) + struct.pack("<2I", 2, 0)
                + f32(2 * 2 + 2 * 3) + f32(2))
    for rank, problem in ((1, "malformed payload (PowerSGD rank 2, where this run's rank is 1)"), (2, None)):
        server = Server(tiny_model, make_conf(sparsifier="powersgd", quantize="none", rank=rank), torch.device("cpu"))
        assert server.receive(rank_two, 0) == problem


def test_fuzzed_payloads_raise_payload_error_or_decode_to_the_models_shape():
    """Hundreds of damaged PowerSGD uploads, under every quantizer: each raises PayloadError or decodes to a dense f32
    tensor per model tensor (finite or not: the server rejects non-finite values); no other exception escapes."""
    g = torch.Generator().manual_seed(7)
    diffs = [torch.randn(n, generator=g) for n in NUMELS]
    goods = [codec.encode(method(rank=rank, quantize=quantize), diffs, 3, 1, 2, SHAPES).payload
             for quantize in codec.QUANTIZERS for rank in (1, 2)]
    rng = random.Random(0)
    decoded = 0
    for trial in range(600):
        data = bytearray(rng.choice(goods))
        kind = trial % 4
        if kind == 0:  # a few bytes anywhere
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # a rank or a row count: the fields that size everything after them
            at = HEADER.size + rng.choice([0, 1] + [2 + 4 * t + rng.randrange(4) for t in range(len(SHAPES))])
            data[at] = rng.randrange(256)
        elif kind == 2:
            data = data[:rng.randrange(len(data))]
        else:
            data = data[:HEADER.size + 2 + 16] + bytes(rng.randrange(256) for _ in range(rng.randrange(400)))
        try:
            _, positions, values = codec.decode(bytes(data), NUMELS)
        except codec.PayloadError:
            continue
        decoded += 1
        assert positions == [None] * len(NUMELS)
        assert [(v.dtype, v.shape) for v in values] == [(torch.float32, (n,)) for n in NUMELS]
    assert decoded >= 50  # the mutations that leave a well-formed payload decode


def test_a_compressed_download_rolls_its_warm_start_back_with_the_round(make_conf):
    """The server's own warm start moves with each committed broadcast, and a rolled-back round takes it back to the
    one before, as it does the server's residual."""
    download = downloads.Compressed(make_conf(download="compressed", download_sparsifier="powersgd", rank=1), [(4, 6)])
    g = torch.Generator().manual_seed(9)
    download.broadcast([torch.randn(24, generator=g)], [], 1)
    assert download.memory is None  # nothing moved yet
    download.commit()
    kept = download.state()
    download.broadcast([torch.randn(24, generator=g)], [], 2)
    download.commit()
    assert not torch.equal(download.memory[0], kept["memory"][0])
    download.roll_back()
    assert download.state()["memory"] is kept["memory"] and download.state()["residual"] is kept["residual"]


# ---- runs ------------------------------------------------------------------------------------------------------

def test_runs_from_the_command_line(write_conf, tmp_path):
    out = tmp_path / "run"
    assert main.main(["-c", write_conf(global_epochs=2, error_feedback=True), "--out", str(out),
                      "--set", "sparsifier=powersgd", "--set", "rank=1"]) == 0
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 2 and all(int(r["rejected"]) == 0 and int(r["refused"]) == 0 for r in rows)
    # the CNN on 1x16x16 images, rank 1: conv 32 x 9 -> 41 values, conv 64 x 288 -> 352, dense 128 x 1024 -> 1152,
    # dense 10 x 128 -> 138, and its biases whole, 32 + 64 + 128 + 10: 1917 f32 values after the header (11 bytes),
    # the rank (2) and 8 row counts (32); two clients a round
    assert all(int(r["upload_bytes"]) == 2 * (11 + 2 + 32 + 4 * 1917) for r in rows)
    assert all(float(r["upload_fraction"]) == 1.0 for r in rows)  # every entry reconstructed


def test_a_resumed_run_repeats_an_uninterrupted_one(write_conf, tmp_path):
    """The clients' warm starts and residuals and the server's own (a PowerSGD download) are in the checkpoint: a run
    stopped after 2 rounds and resumed gives the uninterrupted run's metrics."""
    conf = write_conf(global_epochs=4, sparsifier="powersgd", error_feedback=True, download="compressed",
                      download_sparsifier="powersgd", download_quantize="int8")
    assert main.main(["-c", conf, "--out", str(tmp_path / "whole")]) == 0
    assert main.main(["-c", conf, "--set", "global_epochs=2", "--out", str(tmp_path / "split")]) == 0
    assert main.main(["-c", conf, "--out", str(tmp_path / "split"), "--resume"]) == 0
    whole, split = read_csv(tmp_path / "whole" / "metrics.csv"), read_csv(tmp_path / "split" / "metrics.csv")
    assert len(whole) == 4 and without_seconds(split) == without_seconds(whole)


@pytest.fixture(scope="module")
def finished_powersgd_run(tmp_path_factory):
    """A finished 2-round PowerSGD run with error feedback and a compressed PowerSGD download: its checkpoint holds
    each trained client's residual and warm start (the CNN's: Q' of its four weight matrices at rank 1, 9 + 288 + 1024
    + 128 entries, none for biases), and the download's own."""
    base = tmp_path_factory.mktemp("powersgd")
    conf = base / "conf.json"
    conf.write_text(json.dumps({**TINY, "data_dir": str(base / "data"), "global_epochs": 2, "sparsifier": "powersgd",
                                "rank": 1, "error_feedback": True, "download": "compressed",
                                "download_sparsifier": "powersgd"}))
    assert main.main(["-c", str(conf), "--out", str(base / "run")]) == 0
    return base / "run"


def first(tensors):
    return [tensors[0][:-1]] + list(tensors[1:])


@pytest.mark.parametrize("name, file", [("memory", "memories.bin"), ("residual", "residuals.bin")])
def test_a_nan_warm_start_or_residual_in_the_store_refuses_the_resume(finished_powersgd_run, tmp_path, capsys, name,
                                                                     file):
    """A NaN written into a client's record with its digest made anew (a bug, or a hand edit) would spoil that
    client's every later upload: the resume is refused at once, nothing written."""
    out = tmp_path / "run"
    shutil.copytree(finished_powersgd_run, out)
    state = run_files.load_checkpoint(out, "cpu")
    client_id, (slot, _) = next(iter(state["store"]["records"][name].items()))
    size, start = 4 * sum(state["store"]["numels"][name]), slot * state["store"]["slot_bytes"][name]
    data = bytearray((out / "clients" / file).read_bytes())
    data[start:start + 4] = struct.pack("<f", float("nan"))
    (out / "clients" / file).write_bytes(bytes(data))
    state["store"]["records"][name][client_id] = (slot, hashlib.sha256(data[start:start + size]).digest())
    run_files.write_checkpoint(out, state)
    before = (out / "metrics.csv").read_text()
    capsys.readouterr()
    assert main.main(["--out", str(out), "--resume", "--set", "global_epochs=3"]) == 2
    err = capsys.readouterr().err
    assert f"clients/{file}: client {client_id}'s {name} holds NaN or Inf" in err, err
    assert (out / "metrics.csv").read_text() == before


def test_a_store_table_of_another_model_refuses_the_resume(finished_powersgd_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_powersgd_run, out)
    state = run_files.load_checkpoint(out, "cpu")
    state["store"]["numels"]["memory"][0] -= 1  # a warm start of a tensor one short
    run_files.write_checkpoint(out, state)
    assert main.main(["--out", str(out), "--resume", "--set", "global_epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is not from this run" in err and "its clients' memory has tensors of [8, 0, 288" in err, err


def test_a_warm_start_in_the_checkpoint_of_a_run_whose_clients_keep_none_refuses_the_resume(
        finished_powersgd_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_powersgd_run, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "sparsifier": "topk"}))
    state = run_files.load_checkpoint(out, "cpu")
    state["config"]["sparsifier"] = "topk"
    run_files.write_checkpoint(out, state)
    assert main.main(["--out", str(out), "--resume", "--set", "global_epochs=3"]) == 2
    assert "its clients keep a memory, which this run's clients do not keep" in capsys.readouterr().err


@pytest.mark.parametrize("key, damage, reason", [
    ("memory", first, "its download warm start is not flat f32 tensors of 9, 0, 288, 0, 1024, 0, 128, 0 entries"),
    ("memory", lambda m: [torch.full_like(t, float("inf")) for t in m], "its download warm start holds NaN or Inf"),
    ("residual", lambda r: r[:-1], "its download residual is not 8 tensors"),
], ids=["warm start a tensor one short", "warm start Inf", "residual a tensor missing"])
def test_a_damaged_download_state_in_the_checkpoint_refuses_the_resume(finished_powersgd_run, tmp_path, capsys, key,
                                                                       damage, reason):
    out = tmp_path / "run"
    shutil.copytree(finished_powersgd_run, out)
    state = run_files.load_checkpoint(out, "cpu")
    state["download"][key] = damage(state["download"][key])
    run_files.write_checkpoint(out, state)
    assert main.main(["--out", str(out), "--resume", "--set", "global_epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is not from this run" in err and reason in err, err
