"""Secure aggregation, simulated (secure.py), and the fixed-point quantizer it needs: the same learning bit for bit,
sums in the field with their overflows, the bytes of masked vectors and of the protocol, and what it refuses."""
import json
import math
import struct

import pytest
import torch

import codec
import main
import privacy
import robust
import secure
from server import Server
from conftest import TINY, read_csv
from utils import config, run_files
from utils.seeding import generator

FIXED = {"sparsifier": "none", "quantize": "fixed", "fixed_bits": 8, "fixed_range": 0.01}


def write(tmp_path, name="conf.json", **overrides):
    path = tmp_path / name
    path.write_text(json.dumps({**TINY, "data_dir": str(tmp_path), "global_epochs": 2, **FIXED, **overrides}))
    return str(path)


# ---- the fixed-point quantizer -----------------------------------------------------------------------------------

def test_fixed_point_values_are_clipped_and_rounded_to_a_power_of_two_step():
    method = {**FIXED, "fixed_range": 0.01}
    step = 2.0 ** -13  # 0.01 / 127 = 7.9e-5: the power of two at or above it is 2^-13 = 1.2e-4 (2^-14 is 6.1e-5)
    diff = torch.tensor([0.0, 1e-4, -1.9e-4, 0.5, -0.5, 6.1e-5, 6.2e-5])
    encoded = codec.encode(method, [diff], 3)
    expected = torch.tensor([0, 1, -2, 82, -82, 0, 1], dtype=torch.float32) * step  # 0.01 / step = 81.9: clipped
    assert torch.equal(encoded.values[0], expected)
    assert torch.equal(codec.decode(encoded.payload, [7], method)[2][0], expected)
    header = 3 + 4 + 4 + 1 + 8  # version and ids, count, tensors; bits u8 and range f64
    assert len(encoded.payload) == header + math.ceil(7 * 8 / 8)


@pytest.mark.parametrize("damage, refusal", [
    (lambda p: p[:-1], "payload ends early"),
    (lambda p: p[:11] + bytes([9]) + p[12:], "fixed-point bits 9, where this run's fixed_bits is 8"),
    (lambda p: p[:11] + bytes([25]) + p[12:], "fixed point of 25 bits"),
    (lambda p: p[:-1] + bytes([255]), "a fixed-point code above 254"),
])
def test_damaged_fixed_point_payloads_are_refused(damage, refusal):
    payload = codec.encode(FIXED, [torch.zeros(5)], 1).payload
    with pytest.raises(codec.PayloadError, match=refusal):
        codec.decode(damage(payload), [5], FIXED)


def test_fixed_point_padding_bits_must_be_zero():
    method = {**FIXED, "fixed_bits": 3}
    payload = codec.encode(method, [torch.zeros(5)], 1).payload  # 15 bits: one spare bit in the last byte
    with pytest.raises(codec.PayloadError, match="nonzero padding"):
        codec.decode(payload[:-1] + bytes([payload[-1] | 1]), [5], method)


# ---- the same learning, bit for bit ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [
    {"error_feedback": True},  # dense fixed point, masked_mean
    {"sparsifier": "random", "mask": "shared", "prop": 0.3, "aggregation": "mean", "download": "compressed"},
])
def test_secure_aggregation_learns_bit_for_bit_as_without_it(tmp_path, method):
    plain, hidden = (tmp_path / name for name in ("plain", "secure"))
    assert main.main(["-c", write(tmp_path, **method), "--out", str(plain)]) == 0
    assert main.main(["-c", write(tmp_path, "secure.json", secure_aggregation=True, **method), "--out",
                      str(hidden)]) == 0
    columns = ("round", "accuracy", "loss", "train_loss", "clients", "download_bytes")
    rows = [[{c: row[c] for c in columns} for row in read_csv(run / "metrics.csv")] for run in (plain, hidden)]
    assert rows[0] == rows[1]
    models = [run_files.load_checkpoint(str(run), "cpu")["model"] for run in (plain, hidden)]
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])
    assert all(row["secagg_overflows"] == "0" for row in read_csv(hidden / "metrics.csv"))


def test_masked_vectors_and_the_protocol_are_counted_in_bytes(tmp_path):
    assert main.main(["-c", write(tmp_path, secure_aggregation=True, secagg_bits=24), "--out",
                      str(tmp_path / "run")]) == 0
    row = read_csv(tmp_path / "run" / "metrics.csv")[0]
    # the small CNN on 1x16x16 inputs: two convolutions, a 1024 x 128 layer and the 128 x 10 head, with biases
    numel = (32 * 9 + 32) + (64 * 32 * 9 + 64) + (64 * 4 * 4 * 128 + 128) + (128 * 10 + 10)
    assert int(row["upload_bytes"]) == 2 * math.ceil((numel + 1) * 24 / 8)  # every entry and the count, 3 bytes each
    # k = 2: one neighbour each. Keys 64 B and a share pair 100 B up per client, the unmasking share 36 B; down, the
    # neighbour's keys and shares (164 B) and its id (4 B) in the unmasking round
    assert (int(row["secagg_up_bytes"]), int(row["secagg_down_bytes"])) == (2 * (64 + 100 + 36), 2 * (164 + 4))
    assert int(row["total_bytes"]) == int(row["upload_bytes"]) + int(row["download_bytes"]) + 400 + 336


# ---- the field ---------------------------------------------------------------------------------------------------

def test_sums_wrap_around_the_field_and_the_wrapped_entries_are_counted():
    conf = {**FIXED, "fixed_bits": 4, "fixed_range": 7.0, "secagg_bits": 6, "dp_clip": 0}  # codes -7..7, step 1;
    # the field -32..31
    uploads = [robust.Decoded(3, [None], [torch.tensor([7.0, -7.0, 1.0], dtype=torch.float64)]),
               robust.Decoded(2, [None], [torch.tensor([7.0, -7.0, -1.0], dtype=torch.float64)])]
    sums, weights, total, overflows = secure.field_sums(uploads, [3], conf, "cpu")
    # true sums 35, -35, 1: 35 wraps to 35 - 64 = -29, -35 to 29; the weights 5 fit
    assert sums[0].tolist() == [-29.0, 29.0, 1.0] and weights[0].tolist() == [5.0, 5.0, 5.0] and total == 5
    assert overflows == 2


def test_a_field_without_headroom_for_the_rounds_sum_is_refused(tmp_path, capsys):
    # 4 clients of 500 examples, k = 2: 1000 examples at most, 10 bits, and 8 for the codes: 18 bits
    assert main.main(["-c", write(tmp_path, secure_aggregation=True, secagg_bits=17), "--out",
                      str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "need 18 bits" in error and "up to 1000 examples" in error
    assert main.main(["-c", write(tmp_path, secure_aggregation=True, secagg_bits=18), "--out",
                      str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("overrides, message", [
    ({"sparsifier": "topk"}, "sparsifier 'topk'"),
    ({"sparsifier": "random", "mask": "round"}, "sparsifier 'random' with mask 'round'"),
    ({"quantize": "int8"}, "quantize 'int8'"),
    ({"defense": "median"}, "defense 'median'"),
    ({"attackers": 1}, "simulated attackers"),
    ({"download": "relay"}, "download 'relay'"),
    ({"k": 1}, "k 1 (the sum of one upload is that upload)"),
])
def test_what_does_not_sum_is_refused_in_one_line(tmp_path, capsys, overrides, message):
    assert main.main(["-c", write(tmp_path, secure_aggregation=True, **overrides), "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"secure_aggregation cannot be combined with {message}" in error, error


def test_secagg_bits_alone_is_refused():
    with pytest.raises(config.ConfigError, match="'secagg_bits' acts only with secure_aggregation"):
        config.validate({"secagg_bits": 40})


def test_headroom_is_the_largest_sums_bit_length_and_its_sign():
    conf = config.validate({**FIXED, "secure_aggregation": True, "k": 2, "no_models": 2, "secagg_bits": 18})
    secure.check_headroom(conf, [512, 512])  # 1024 * 127 = 130048 < 2^17: 17 bits and the sign
    with pytest.raises(secure.SecureAggregationError, match="need 18 bits"):
        secure.check_headroom({**conf, "secagg_bits": 17}, [512, 512])
    with pytest.raises(secure.SecureAggregationError, match="past 2\\^53"):
        secure.check_headroom({**conf, "fixed_bits": 24, "secagg_bits": 62}, [2 ** 30, 2 ** 30])


def test_an_upload_off_the_shared_mask_is_carried_onto_it():
    conf = config.validate({"sparsifier": "random", "mask": "shared", "prop": 0.5, "seed": 3})
    shared = secure.movable(conf, 2, [8])[0]
    elsewhere = torch.tensor([i for i in range(8) if i not in shared.tolist()][:2] + shared.tolist()[:1])
    upload = robust.Decoded(1, [elsewhere.sort().values], [torch.arange(1.0, 4.0, dtype=torch.float64)])
    (carried,) = secure.on_shared_mask([upload], conf, 2, [8])
    assert torch.equal(carried.positions[0], shared)
    sent = dict(zip(upload.positions[0].tolist(), upload.values[0].tolist()))
    assert carried.values[0].tolist() == [sent.get(p, 0.0) for p in shared.tolist()]


def test_non_finite_values_land_on_the_grid_as_the_receiver_reads_them():
    diff = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.003])
    encoded = codec.encode(FIXED, [diff], 1)
    decoded = codec.decode(encoded.payload, [4], FIXED)[2][0]
    assert torch.equal(decoded, encoded.values[0])
    step = 2.0 ** -13
    assert decoded.tolist() == [0.0, 82 * step, -82 * step, 25 * step]  # 0.003 / step = 24.6


def test_a_range_whose_step_would_underflow_is_refused():
    with pytest.raises(config.ConfigError, match="fixed_range"):
        config.validate({**FIXED, "fixed_range": 1e-300})
    payload = bytearray(codec.encode(FIXED, [torch.zeros(3)], 1).payload)
    payload[12:20] = struct.pack("<d", 5e-324)
    with pytest.raises(codec.PayloadError, match="is not one fedsparse writes"):
        codec.decode(bytes(payload), [3], None)


# ---- differential privacy under secure aggregation: the clients clip --------------------------------------------

DP_SECURE = {**FIXED, "secure_aggregation": True, "dp_clip": 1.0, "fixed_range": 1.0}  # step 1/64


def encode_clipped(conf, diffs):
    encoded, clipped = privacy.encode_clipped(diffs, conf, 1, lambda sent: codec.encode(conf, sent, 1))
    assert torch.equal(encoded.values[0], codec.encode(conf, clipped, 1).values[0])  # what it encoded
    return encoded


def test_a_client_clips_its_update_so_that_what_it_sends_is_within_the_bound():
    conf = config.validate(DP_SECURE)
    # norm 5, clipped to 1: 0.6 and 0.8 are 38.4 and 51.2 steps of 1/64, rounded to 38 and 51, norm 0.99376
    assert encode_clipped(conf, [torch.tensor([3.0, 4.0])]).values[0].tolist() == [38 / 64, 51 / 64]
    # within the bound (norm 0.99999) at 45.006 and 45.506 steps, it rounds to 45 and 46, norm 1.0055: the client
    # takes the excess off its squared norm (0.99999^2 - 0.01105: norm 0.9944, 44.75 and 45.25 steps), and that
    # rounds to 45 and 45, norm 0.9944
    diff = torch.tensor([45 / 64, 45.5 / 64]) * 1.0 / math.hypot(45, 45.5) * 64 * 0.99999
    sent = encode_clipped(conf, [diff]).values[0]
    assert sent.tolist() == [45 / 64, 45 / 64] and math.hypot(*sent.tolist()) <= 1.0
    small = torch.tensor([0.25, -0.5])
    assert torch.equal(encode_clipped(conf, [small]).values[0], small)  # within the bound and on the grid: as it is


def test_no_update_a_client_sends_passes_the_bound_after_rounding():
    conf = config.validate({**DP_SECURE, "dp_clip": 0.05, "fixed_range": 0.01, "fixed_bits": 6})  # step 2^-11
    source = torch.Generator().manual_seed(0)
    norms = []
    for trial in range(200):
        diffs = [torch.randn(300, generator=source) * 0.01 * (trial % 7), torch.randn(7, generator=source) * 0.001]
        sent = encode_clipped(conf, diffs).values
        norms.append(math.sqrt(sum(float(v.double().square().sum()) for v in sent)))
    assert max(norms) <= 0.05
    assert sorted(norms)[100] > 0.049  # and most are clipped close to it, not to the worst case (0.05 - 0.0043)


def test_under_dp_the_server_adds_noise_to_the_unweighted_sum_and_divides_by_k():
    conf = config.validate({**DP_SECURE, "no_models": 4, "k": 3, "dp_noise_multiplier": 0.5, "seed": 7,
                            "server_validation": 0})
    model = torch.nn.Linear(2, 1, bias=False)
    start = model.weight.detach().clone().flatten()
    server = Server(model, conf, "cpu", registered=[10, 300, 5, 5])
    sent = [[0.5, 0.25], [-0.125, 1.0]]  # on the grid, norms within 1: what two clients clipped and rounded
    for client_id, values in enumerate(sent):
        server.receive(codec.encode(conf, [torch.tensor(values)], [10, 300][client_id]).payload, client_id)
    assert server.aggregate(round_index=2) is None
    noise = 0.5 * 1.0 * torch.randn(2, generator=generator(7, "dp noise", 2), dtype=torch.float64)
    expected = (torch.tensor([0.375, 1.25], dtype=torch.float64) + noise) / 3  # each weighs 1, over k = 3
    assert torch.equal(model.weight.detach().flatten(), (start.double() + expected.float()).float()) or \
        torch.allclose(model.weight.detach().flatten(), start + expected.float(), atol=1e-7)


def test_dp_under_secure_aggregation_runs_accounts_and_resumes_exactly(tmp_path):
    conf = write(tmp_path, **{**DP_SECURE, "fixed_range": 0.01, "dp_clip": 0.1, "dp_noise_multiplier": 0.3,
                              "no_models": 8, "k": 3, "global_epochs": 3, "error_feedback": True})
    assert main.main(["-c", conf, "--out", str(tmp_path / "straight")]) == 0
    assert main.main(["-c", conf, "--set", "global_epochs=2", "--out", str(tmp_path / "resumed")]) == 0
    assert main.main(["--out", str(tmp_path / "resumed"), "--resume", "--set", "global_epochs=3"]) == 0
    rows = read_csv(tmp_path / "straight" / "metrics.csv")
    assert [row["epsilon"] for row in rows] == [row["epsilon"] for row in read_csv(tmp_path / "resumed" /
                                                                                   "metrics.csv")]
    assert float(rows[-1]["epsilon"]) > float(rows[0]["epsilon"]) > 0
    assert all(row["refused"] == "0" for row in rows)  # every round moved the model
    assert [row["accuracy"] for row in rows] == [row["accuracy"] for row in read_csv(tmp_path / "resumed" /
                                                                                     "metrics.csv")]
    assert all(int(row["secagg_up_bytes"]) > 0 for row in rows if row["clients"])


def test_under_dp_the_field_holds_every_client_weighing_one():
    conf = config.validate({**DP_SECURE, "no_models": 1000, "k": 100, "secagg_bits": 18})
    secure.check_headroom(conf, [60] * 1000)  # Poisson may take all 1000: 1000 * 127 = 127000 < 2^17
    with pytest.raises(secure.SecureAggregationError, match="all 1000 clients, 1 each .* need 18 bits"):
        secure.check_headroom({**conf, "secagg_bits": 17}, [60] * 1000)


def test_a_clip_within_fixed_points_rounding_is_refused_in_one_line(tmp_path, capsys):
    # the small CNN's 140554 entries at step 2^-13 (range 0.01, 8 bits): rounding can add 0.0229 to a norm
    assert main.main(["-c", write(tmp_path, **{**DP_SECURE, "fixed_range": 0.01, "dp_clip": 0.02}), "--out",
                      str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "dp_clip 0.02 is within fixed point's rounding" in error, error


def test_a_round_with_one_upload_sums_nothing_and_runs_no_protocol():
    from client import Upload
    lone = [Upload(0, b"x", 0.5), Upload(1, b"", float("nan"), problem="no reply")]
    assert [u.problem for u in secure.at_least_two(lone)] == [
        "secure aggregation needs two uploads in a round, this one has one", "no reply"]
    pair = [Upload(0, b"x", 0.5), Upload(1, b"y", 0.5)]
    assert secure.at_least_two(pair) == pair
    assert secure.protocol_bytes(1, 1) == (0, 0) and secure.protocol_bytes(2, 2) == (400, 336)
