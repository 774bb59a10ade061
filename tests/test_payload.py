"""utils/payload.py: random masks, the wire format's round trip and byte counts, and rejection of malformed bytes."""
import math
import struct

import pytest
import torch

import models
from conftest import dense_from
from utils import payload

HEADER_BYTES, RANDOM_HEADER_BYTES, TENSOR_HEADER_BYTES, VALUE_BYTES = 10, 16, 5, 4


def cnn_numels():
    model = models.build("cnn", (1, 16, 16), 10)
    return [t.numel() for t in model.state_dict().values() if torch.is_floating_point(t)]


def random_diffs(numels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for n in numels]


def masked_plainly(diffs, masks):
    """Reference: diff where the boolean mask is set, 0 elsewhere."""
    return [torch.where(mask, diff, torch.zeros_like(diff)) for diff, mask in zip(diffs, masks)]


def bool_mask(kept, numel):
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[kept] = True
    return mask


# ---- random masks ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prop", [0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_random_positions_keep_about_prop(prop):
    numels = [200_000, 50_000, 1_000]
    positions = payload.random_positions(1234, prop, numels)
    assert len(positions) == len(numels)
    for kept, numel in zip(positions, numels):
        assert kept.dtype == torch.int64
        if len(kept):
            assert kept.min() >= 0 and kept.max() < numel
            assert torch.all(kept[1:] > kept[:-1])  # sorted, no repeats
        if prop in (0.0, 1.0):
            assert len(kept) == numel * prop
        else:
            sd = math.sqrt(numel * prop * (1 - prop))
            assert abs(len(kept) - prop * numel) <= 4 * sd


def test_random_positions_on_model_tensors_and_seeds():
    numels = cnn_numels()
    a = payload.random_positions(7, 0.3, numels)
    b = payload.random_positions(7, 0.3, numels)
    c = payload.random_positions(8, 0.3, numels)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed: same mask
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # another seed: another mask
    total = sum(numels)
    kept = sum(len(x) for x in a)
    assert abs(kept - 0.3 * total) <= 4 * math.sqrt(total * 0.3 * 0.7)


# ---- round trips -----------------------------------------------------------------------------------------------

def test_dense_round_trip():
    numels = [6, 2, 1000]
    diffs = random_diffs(numels)
    encoded = payload.encode(payload.DENSE, diffs, [None] * 3, 17)
    assert len(encoded) == HEADER_BYTES + VALUE_BYTES * sum(numels)
    num_samples, positions, values = payload.decode(encoded, numels)
    assert num_samples == 17
    assert positions == [None, None, None]
    for value, diff in zip(values, diffs):
        assert value.dtype == torch.float32
        assert torch.equal(value, diff)


@pytest.mark.parametrize("prop", [0.0, 0.3, 1.0])
def test_random_round_trip(prop):
    numels = cnn_numels()
    diffs = random_diffs(numels, seed=1)
    seed = 99
    kept = payload.random_positions(seed, prop, numels)
    encoded = payload.encode(payload.RANDOM, diffs, kept, 750, seed, prop)
    sent = sum(len(k) for k in kept)
    assert len(encoded) == HEADER_BYTES + RANDOM_HEADER_BYTES + VALUE_BYTES * sent
    num_samples, positions, values = payload.decode(encoded, numels)
    assert num_samples == 750
    for got, expected in zip(positions, kept):  # the receiver regenerates the mask from the seed
        assert torch.equal(got, expected)
    expected = masked_plainly(diffs, [bool_mask(k, n) for k, n in zip(kept, numels)])
    for got, want in zip(dense_from(positions, values, numels), expected):
        assert torch.equal(got, want)


def test_topk_round_trip_and_size():
    numels = cnn_numels()
    diffs = random_diffs(numels, seed=2)
    g = torch.Generator().manual_seed(3)
    # arbitrary sorted positions of varied densities, including an empty and a full tensor
    densities = [0.0, 1.0, 0.02, 0.5, 0.001, 0.2, 0.05, 0.7]
    assert len(densities) == len(numels)
    kept = []
    for numel, density in zip(numels, densities):
        kept.append((torch.rand(numel, generator=g) < density).nonzero().squeeze(1))
    encoded = payload.encode(payload.TOPK, diffs, kept, 5)
    expected_size = HEADER_BYTES
    for k, numel in zip(kept, numels):
        width = 1 if numel <= 256 else 2 if numel <= 65536 else 4
        expected_size += TENSOR_HEADER_BYTES + min(len(k) * width, math.ceil(numel / 8)) + VALUE_BYTES * len(k)
    assert len(encoded) == expected_size
    num_samples, positions, values = payload.decode(encoded, numels)
    assert num_samples == 5
    for got, expected in zip(positions, kept):
        assert torch.equal(got, expected)
    expected = masked_plainly(diffs, [bool_mask(k, n) for k, n in zip(kept, numels)])
    for got, want in zip(dense_from(positions, values, numels), expected):
        assert torch.equal(got, want)


def test_decoded_diff_fits_the_state_dict():
    model = models.build("cnn", (1, 16, 16), 10)
    state = {name: t for name, t in model.state_dict().items() if torch.is_floating_point(t)}
    numels = [t.numel() for t in state.values()]
    diffs = random_diffs(numels, seed=4)
    kept = payload.random_positions(5, 0.5, numels)
    _, positions, values = payload.decode(payload.encode(payload.RANDOM, diffs, kept, 1, 5, 0.5), numels)
    for (name, tensor), full, diff, k in zip(state.items(), dense_from(positions, values, numels), diffs, kept):
        restored = full.view(tensor.shape)
        assert restored.shape == tensor.shape and restored.dtype == tensor.dtype == torch.float32
        assert torch.equal(restored.flatten()[k], diff[k])


# ---- top-k position encoding: bitmap or index list, whichever is smaller ---------------------------------------

def topk_fields(encoded):
    """(positions code, count) of the first tensor, read by hand from the documented layout."""
    return encoded[HEADER_BYTES], struct.unpack_from("<I", encoded, HEADER_BYTES + 1)[0]


@pytest.mark.parametrize("numel, kept, code, position_bytes", [
    (100, [3, 17, 50, 51, 99], 1, 5),  # u8 list: 5 bytes < 13-byte bitmap
    (100, list(range(0, 100, 2)), 0, 13),  # 50 u8 indices > 13-byte bitmap
    (256, [0, 255], 1, 2),  # 256 entries still fit u8 indices
    (257, [0, 256], 2, 4),  # 257 need u16
    (1000, list(range(0, 1000, 100)), 2, 20),  # 10 u16 = 20 < 125
    (1000, list(range(0, 1000, 10)), 0, 125),  # 100 u16 = 200 > 125
    (65536, [0, 65535], 2, 4),
    (65537, [1, 65536], 3, 8),  # u32 indices
    (70000, list(range(0, 70000, 7)), 0, 8750),  # 10000 u32 > 8750-byte bitmap
    (100, [], 1, 0),  # nothing kept: an empty list
])
def test_topk_position_encoding_choice(numel, kept, code, position_bytes):
    diff = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    positions = torch.tensor(kept, dtype=torch.int64)
    encoded = payload.encode(payload.TOPK, [diff], [positions], 1)
    assert topk_fields(encoded) == (code, len(kept))
    assert len(encoded) == HEADER_BYTES + TENSOR_HEADER_BYTES + position_bytes + VALUE_BYTES * len(kept)
    _, decoded_positions, values = payload.decode(encoded, [numel])
    assert decoded_positions[0].tolist() == kept
    assert torch.equal(values[0], diff[positions])


def test_topk_tie_between_bitmap_and_list_has_the_same_size():
    numel, kept = 80, torch.arange(0, 80, 8)  # 10 u8 indices, 10-byte bitmap
    encoded = payload.encode(payload.TOPK, [torch.ones(numel)], [kept], 1)
    assert len(encoded) == HEADER_BYTES + TENSOR_HEADER_BYTES + 10 + VALUE_BYTES * 10
    assert torch.equal(payload.decode(encoded, [numel])[1][0], kept)


# ---- malformed payloads ----------------------------------------------------------------------------------------

def sample_payloads():
    numels = [100, 300]
    diffs = random_diffs(numels, seed=6)
    kept = [torch.tensor([1, 5, 9]), torch.arange(0, 300, 2)]
    return numels, {
        "dense": payload.encode(payload.DENSE, diffs, [None, None], 3),
        "random": payload.encode(payload.RANDOM, diffs, payload.random_positions(4, 0.5, numels), 3, 4, 0.5),
        "topk": payload.encode(payload.TOPK, diffs, kept, 3),
    }


@pytest.mark.parametrize("kind", ["dense", "random", "topk"])
def test_truncated_or_padded_payload_is_rejected(kind):
    numels, encoded = sample_payloads()
    good = encoded[kind]
    payload.decode(good, numels)  # well-formed
    for cut in (1, 4, len(good) - HEADER_BYTES, len(good) - 3):
        with pytest.raises(payload.PayloadError):
            payload.decode(good[:-cut], numels)
    with pytest.raises(payload.PayloadError):
        payload.decode(good + b"\0", numels)
    with pytest.raises(payload.PayloadError):
        payload.decode(b"", numels)


@pytest.mark.parametrize("kind", ["dense", "random", "topk"])
def test_wrong_tensor_count_is_rejected(kind):
    numels, encoded = sample_payloads()
    with pytest.raises(payload.PayloadError):
        payload.decode(encoded[kind], numels + [10])
    with pytest.raises(payload.PayloadError):
        payload.decode(encoded[kind], numels[:1])


def test_bad_header_fields_are_rejected():
    numels, encoded = sample_payloads()
    dense = bytearray(encoded["dense"])
    bad_version = bytes([2]) + bytes(dense[1:])
    bad_kind = bytes(dense[:1]) + bytes([7]) + bytes(dense[2:])
    for bad in (bad_version, bad_kind):
        with pytest.raises(payload.PayloadError):
            payload.decode(bad, numels)


def topk_bytes(code, count, positions, values, numel_tensors=1):
    head = struct.pack("<BBII", 1, payload.TOPK, 1, numel_tensors)
    return head + struct.pack("<BI", code, count) + positions + struct.pack(f"<{len(values)}f", *values)


def test_bad_topk_positions_are_rejected():
    numel = 16
    # well-formed by hand: u8 list [2, 5]
    good = topk_bytes(1, 2, bytes([2, 5]), [1.0, 2.0])
    _, positions, values = payload.decode(good, [numel])
    assert positions[0].tolist() == [2, 5] and values[0].tolist() == [1.0, 2.0]
    cases = [
        topk_bytes(9, 2, bytes([2, 5]), [1.0, 2.0]),  # unknown positions code
        topk_bytes(1, 2, bytes([5, 2]), [1.0, 2.0]),  # not increasing
        topk_bytes(1, 2, bytes([5, 5]), [1.0, 2.0]),  # repeated
        topk_bytes(1, 2, bytes([2, 16]), [1.0, 2.0]),  # out of range
        topk_bytes(0, 3, bytes([0b10000000, 0b00000001]), [1.0, 2.0, 3.0]),  # bitmap marks 2, header says 3
    ]
    for bad in cases:
        with pytest.raises(payload.PayloadError):
            payload.decode(bad, [numel])
    # a bitmap by hand: entries 0 and 15 of 16
    bitmap = topk_bytes(0, 2, bytes([0b10000000, 0b00000001]), [1.0, 2.0])
    assert payload.decode(bitmap, [numel])[1][0].tolist() == [0, 15]
