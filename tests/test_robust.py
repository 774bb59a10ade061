"""Robustness: by default one hostile client can neither outweigh the others by its claim (cut to its share's size)
nor leave the model non-finite (a round after which the test loss is not finite is rolled back); the defenses on
hand-computed numbers, sparse uploads included; the simulated attacks; honest runs unchanged."""
import copy
import dataclasses
import math
import struct

import pytest
import torch

import codec
import downloads
import federation
import models
import robust
from client import Client
from client_store import ClientStore
from conftest import TINY, handmade_upload, lenient, without_seconds
from engines.inprocess import InProcess
from server import Server
from utils import config, partition, plot
from utils.seeding import derive_seed

CPU = torch.device("cpu")
MAX_COUNT = 2**32 - 1
GLOBAL_W = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # tiny_model's weight, flattened
GLOBAL_B = [0.5, -0.5]


def hostile_payload(kind, conf, numels, honest):
    """A hostile upload: 1e30 in every entry the run's method sends (finite: it passes every check the decoder makes),
    one of another method written by hand from the layout in codec/__init__.py (sparsifier none 0, quantizer ternary
    4, a shared magnitude of 1e38), or the honest upload claiming 2^32-1 examples."""
    if kind == "1e30":
        return codec.encode(conf, [torch.full((n,), 1e30) for n in numels], 750, mask_seed=1).payload
    if kind == "ternary 1e38":  # every entry, one shared magnitude 1e38, every sign bit 0 (+)
        header = struct.pack("<BBBII", 2, 0, 4, 750, len(numels))
        return header + bytes([1]) + struct.pack("<f", 1e38) + bytes(math.ceil(sum(numels) / 8))
    claims_everything = bytearray(honest)  # the honest upload, claiming 2^32-1 examples (u32 at offset 3)
    struct.pack_into("<I", claims_everything, 3, MAX_COUNT)
    return bytes(claims_everything)


class Hostile(InProcess):
    """In round 1 the first sampled client's upload is replaced by a hostile one."""

    def __init__(self, conf, dataset, shares, workspace, store, kind):
        super().__init__(conf, dataset, shares, workspace, store)
        self.conf, self.kind = conf, kind

    def train(self, chosen, syncs, global_state, round_index, progress=None):
        uploads = super().train(chosen, syncs, global_state, round_index, progress)
        if round_index == 1:
            numels = [t.numel() for t in global_state.values() if torch.is_floating_point(t)]
            uploads[0].payload = hostile_payload(self.kind, self.conf, numels, uploads[0].payload)
        return uploads


def flat_globals(server):
    return [t.tolist() for t in server.flat_globals()]


def moved_by(update_w, update_b):
    return [[g + u for g, u in zip(GLOBAL_W, update_w)], [g + u for g, u in zip(GLOBAL_B, update_b)]]


def assert_close(got, expected):
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)


# ---- the safe default: rollback ---------------------------------------------------------------------------------

def test_a_round_made_non_finite_by_one_upload_is_rolled_back(make_conf, synthetic, capsys, tmp_path):
    conf = make_conf()
    validation, shares = partition.server_and_clients(synthetic, conf)
    model = models.build("cnn", synthetic.input_shape, synthetic.num_classes)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    server = Server(model, conf, CPU, registered=[len(share) for share in shares],
                    validation=synthetic.train_split(validation))
    accuracy, loss = server.evaluate(synthetic.test_inputs, synthetic.test_labels)
    transport = Hostile(conf, synthetic, shares, copy.deepcopy(model), ClientStore(str(tmp_path), {}, 0, False), "1e30")
    row = federation.play_round(1, conf, server, transport, synthetic)
    assert "round 1: rolled back: the validation loss after it was not finite" in capsys.readouterr().err
    assert row["refused"] == 1 and row["rejected"] == 0  # accepted (finite), then undone
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert (row["accuracy"], row["loss"]) == (round(accuracy, 6), round(loss, 6))  # of the model as it was
    assert server.syncs.version == 1  # the round happened, and changed nothing


def test_an_upload_of_another_method_is_rejected_unread(honest_run, tmp_path, capsys):
    """A ternary upload in a run of random masks and f32 values: refused from its header (its 1e38 never decoded)."""
    conf, honest = honest_run
    rows = federation.run({**conf, "global_epochs": 2}, str(tmp_path / "run"), False,
                          lambda *args: Hostile(*args, "ternary 1e38"))
    assert [(row["rejected"], row["refused"]) for row in rows] == [(1, 0), (0, 0)]
    assert "malformed payload (sparsifier none and quantize ternary, where this run's are random and none)" in \
        capsys.readouterr().err
    assert rows[1]["upload_bytes"] == honest[1]["upload_bytes"]


def test_a_round_whose_finite_validation_loss_blew_up_is_rolled_back(make_conf, tmp_path, capsys):
    """Under STC, one client's 2 in every entry lands on the entries only it sent: the loss stays finite, above 10
    times a uniform guess's but below the 100 times this rule allowed before (which let a noisy upload kill a CNN);
    the round is rolled back and the run goes on."""
    stc = dict(sparsifier="topk", topk_scope="model", quantize="ternary", prop=0.04, error_feedback=True,
               global_epochs=4)
    rows = federation.run(make_conf(**stc, attackers=1, attack="fill", attack_scale=2, attack_until=1),
                          str(tmp_path / "run"), False, InProcess)
    guess = math.log(10)  # the synthetic data's 10 classes
    err = capsys.readouterr().err
    assert "round 1: rolled back: the validation loss after it was " in err
    assert f"over 10 times a uniform guess's ({guess:.2f})" in err and "not finite" not in err
    blown = float(err.split("the validation loss after it was ")[1].split(",")[0])
    assert 10 * guess < blown < 100 * guess
    assert [row["refused"] for row in rows] == [1, 0, 0, 0]
    assert all(row["loss"] < 10 * guess for row in rows)


def scaled(dataset, which, indices):
    """`dataset` with the images of one split (at `indices`) times 1e6: a model scores them with a huge loss."""
    images = getattr(dataset, which).clone()
    images[indices] *= 1e6
    return dataclasses.replace(dataset, **{which: images})


def test_the_rollback_reads_the_validation_split_and_never_the_test_split(make_conf, synthetic, tmp_path, monkeypatch,
                                                                          capsys):
    """Test images that score a huge loss steer nothing: the run is the honest run's bit for bit. Validation images
    that do make every round roll back."""
    conf = make_conf()
    validation, _ = partition.server_and_clients(synthetic, conf)
    honest = federation.run(conf, str(tmp_path / "honest"), False, InProcess)
    monkeypatch.setattr(federation.datasets, "load", lambda *args: scaled(synthetic, "test_inputs", slice(None)))
    scored = federation.run(conf, str(tmp_path / "test"), False, InProcess)
    assert min(row["loss"] for row in scored) > 100 * math.log(10)  # the old, test-split rule rolled each round back
    assert [row["refused"] for row in scored] == [0, 0, 0] and "rolled back" not in capsys.readouterr().err
    unscored = {"accuracy": None, "loss": None}
    assert [row | unscored for row in without_seconds(scored)] == [row | unscored for row in without_seconds(honest)]
    monkeypatch.setattr(federation.datasets, "load", lambda *args: scaled(synthetic, "train_inputs", validation))
    steered = federation.run(conf, str(tmp_path / "validation"), False, InProcess)
    assert [row["refused"] for row in steered] == [1, 1, 1]
    assert "rolled back: the validation loss after it was" in capsys.readouterr().err


def test_without_server_validation_nothing_is_held_out_and_no_finite_round_is_rolled_back(make_conf, tmp_path,
                                                                                          capsys):
    """server_validation 0: every example is a client's, and one upload of 1e30 (finite) is not rolled back: the model
    it leaves scores NaN, and the clients' uploads from it are rejected."""
    rows = federation.run(make_conf(server_validation=0, attackers=1, attack="fill", attack_scale=1e30,
                                    attack_until=1), str(tmp_path / "run"), False, InProcess)
    assert "3000 train (0 held by the server for validation)" in capsys.readouterr().out
    assert rows[0]["refused"] == 0 and math.isnan(rows[0]["loss"])


@pytest.mark.parametrize("loss, why", [
    (2.5, None), (10 * math.log(10) - 1e-9, None),  # 23.02585...: a uniform guess's 2.3026 times 10
    (10 * math.log(10) + 1e-9, "the validation loss after it was 23.03, over 10 times a uniform guess's (2.30)"),
    (218.4, "the validation loss after it was 218.4, over 10 times a uniform guess's (2.30)"),  # a noisy upload's
    (7.7e31, "the validation loss after it was 7.7e+31, over 10 times a uniform guess's (2.30)"),
    (math.inf, "the validation loss after it was not finite"),
    (math.nan, "the validation loss after it was not finite"),
])
def test_blown_up_by_hand(loss, why):
    assert federation.blown_up(loss, 10) == why


def test_roll_back_leaves_what_a_refused_round_leaves(tiny_model, make_conf):
    """Server momentum, the compressed download's residual and the sync log go back too: after round 2 is rolled
    back, the server is as one whose round 2 accepted no upload."""
    conf = make_conf(aggregation="mean", server_momentum=0.5, download="compressed")  # 1 of 8 entries broadcast
    rolled, refused = lenient(Server(tiny_model, conf, CPU)), lenient(Server(copy.deepcopy(tiny_model), conf, CPU))
    for server in (rolled, refused):
        assert server.receive(handmade_upload(1, [[1, -2, 3, 0, 0, 6], [1, 1]])) is None
        assert server.aggregate(1) is None
    after_round_1 = flat_globals(rolled)
    assert rolled.receive(handmade_upload(1, [[1e30] * 6, [1e30] * 2])) is None
    assert rolled.aggregate(2) is None and flat_globals(rolled) != after_round_1
    rolled.roll_back()
    assert refused.aggregate(2) == "no upload was accepted"
    assert flat_globals(rolled) == flat_globals(refused) == after_round_1
    assert all(torch.equal(a, b) for a, b in zip(rolled.velocity, refused.velocity))
    assert all(torch.equal(a, b) for a, b in zip(rolled.download.residual, refused.download.residual))
    state, expected = rolled.syncs.state(), refused.syncs.state()
    assert state["version"] == expected["version"] == 2 and state["log"] == expected["log"]
    assert state["log"][-1] == (2, [])
    assert all(torch.equal(a, b) for a, b in zip(state["last_changed"], expected["last_changed"]))


# ---- the targets: one hostile upload in round 1, default settings ----------------------------------------------

# Two runs are compared where neither is chaotic, and over rounds rather than at one. At TINY's lr 0.05 these runs are
# chaotic (a round can lose 30 points): on six float paths (1 or 2 threads; ATEN_CPU_CAPABILITY avx512, avx2 or
# default, as other CPUs take) the honest and the attacked run ended round 12 from 0.2 to 5.6 points apart, where the
# test allowed 1. At lr 0.02 the same paths move no round by more than 0.6 points. After 24 rounds both runs are near
# their plateau, where a single round still wobbles (by 0.9 points from one round to the next on average, 3.7 at most,
# over rounds 20-24 of seeds 0-11), so the mean over the last 5 rounds is compared: honest minus attacked was +0.04 to
# +0.22 points on the six paths, and within 0.76 points over seeds 0-11 (mean +0.33, sd 0.29: the cost of the round
# lost).
ROUNDS, LAST = 24, 5


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory):
    conf = config.validate({**TINY, "lr": 0.02, "global_epochs": ROUNDS,
                            "data_dir": str(tmp_path_factory.mktemp("data"))})
    return conf, federation.run(conf, str(tmp_path_factory.mktemp("honest")), False, InProcess)


def last_rounds_accuracy(rows):
    return sum(row["accuracy"] for row in rows[-LAST:]) / LAST


def test_one_hostile_upload_costs_the_run_at_most_a_point(honest_run, tmp_path):
    """Round 1 is rolled back and the run goes on: it ends where the honest run does, within a point, in the mean of
    its last 5 rounds (the last round alone wobbles by more than a point)."""
    conf, honest = honest_run
    rows = federation.run(conf, str(tmp_path / "run"), False, lambda *args: Hostile(*args, "1e30"))
    assert [row["refused"] for row in rows] == [1] + [0] * (ROUNDS - 1)  # later honest uploads are accepted again
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert abs(last_rounds_accuracy(rows) - last_rounds_accuracy(honest)) <= 0.01


def test_a_claim_of_2_32_minus_1_examples_counts_as_the_clients_share(honest_run, tmp_path):
    conf, honest = honest_run
    rows = federation.run({**conf, "global_epochs": 12}, str(tmp_path / "run"), False,  # 12 rounds show it
                          lambda *args: Hostile(*args, "count"))
    assert without_seconds(rows) == without_seconds(honest[:12])


def test_claimed_counts_are_cut_to_the_registered_ones(tiny_model, make_conf):
    server = lenient(Server(tiny_model, make_conf(aggregation="mean"), CPU, registered=[1, 3, 10]))
    assert server.receive(handmade_upload(1, [[1] * 6, [1, 1]]), client_id=0) is None  # its share
    assert server.receive(handmade_upload(MAX_COUNT, [[5] * 6, [5, 5]]), client_id=1) is None  # cut to 3
    assert server.receive(handmade_upload(4, [[2] * 6, [2, 2]]), client_id=2) is None  # fewer than 10: kept
    # a relay forwards the counts the server used: the u32 at offset 3 of each payload
    _, forwarded = downloads.Relay(server.conf, []).broadcast(None, server.accepted_payloads, 1)
    assert [struct.unpack_from("<I", payload, 3)[0] for payload in forwarded] == [1, 3, 4]
    server.aggregate()
    step = (1 * 1 + 3 * 5 + 4 * 2) / 8
    assert_close(flat_globals(server), moved_by([step] * 6, [step] * 2))


# ---- defenses, by hand ----------------------------------------------------------------------------------------

def sparse(num_samples, w_diff, w_kept, b_diff, b_kept):
    return handmade_upload(num_samples, [w_diff, b_diff], [w_kept, b_kept])


# A: weight entries 0-2 and bias 0; B: weight 1-3 and bias 1; C: weight 2-4 and both biases; weight 5: nobody
SPARSE = [sparse(1, [1, 2, 3, 4, 5, 6], [0, 1, 2], [10, 20], [0]),
          sparse(3, [5, 6, 7, 8, 9, 10], [1, 2, 3], [30, 40], [1]),
          sparse(2, [-1, -2, -3, -4, -5, -6], [2, 3, 4], [-10, -20], [0, 1])]
# four dense uploads and a fifth that sends weight entries 0-2 only
FIVE = [handmade_upload(1, [[v] * 6, [v - 1, v - 1]]) for v in (1, 2, 3)] + [
    handmade_upload(1, [[4] * 6, [3, 30]]), sparse(1, [100, -100, 0, 0, 0, 0], [0, 1, 2], [0, 0], [])]


def aggregated(tiny_model, make_conf, uploads, **settings):
    server = lenient(Server(tiny_model, make_conf(**settings), CPU))
    for upload in uploads:
        assert server.receive(upload) is None
    assert server.aggregate() is None
    return flat_globals(server)


def test_median_per_entry_over_its_senders(tiny_model, make_conf):
    got = aggregated(tiny_model, make_conf, SPARSE, defense="median")
    # w0: A 1 | w1: A 2, B 6 -> 4 | w2: A 3, B 7, C -3 -> 3 | w3: B 8, C -4 -> 2 | w4: C -5 | w5: nobody -> 0
    # b0: A 10, C -10 -> 0 | b1: B 40, C -20 -> 10; unweighted: the counts 1, 3, 2 do not enter
    assert_close(got, moved_by([1, 4, 3, 2, -5, 0], [0, 10]))


def test_median_of_five(tiny_model, make_conf):
    got = aggregated(tiny_model, make_conf, FIVE, defense="median")
    # w0: 1 2 3 4 100 -> 3 | w1: -100 1 2 3 4 -> 2 | w2: 0 1 2 3 4 -> 2 | w3-w5: 1 2 3 4 -> 2.5
    # b0: 0 1 2 3 -> 1.5 | b1: 0 1 2 30 -> 1.5
    assert_close(got, moved_by([3, 2, 2, 2.5, 2.5, 2.5], [1.5, 1.5]))


def test_trimmed_mean_drops_a_fraction_of_each_entrys_senders(tiny_model, make_conf):
    got = aggregated(tiny_model, make_conf, FIVE, defense="trimmed_mean", trim_fraction=0.2)
    # five senders: floor(0.2 * 5) = 1 dropped at each end; four: floor(0.8) = 0, the plain mean
    # w0: 2 3 4 -> 3 | w1: 1 2 3 -> 2 | w2: 1 2 3 -> 2 | w3-w5: 2.5 | b0: 1.5 | b1: (0 + 1 + 2 + 30) / 4
    assert_close(got, moved_by([3, 2, 2, 2.5, 2.5, 2.5], [1.5, 8.25]))


def test_trimmed_mean_of_sparse_uploads(tiny_model, make_conf):
    got = aggregated(tiny_model, make_conf, SPARSE, defense="trimmed_mean", trim_fraction=0.4)
    # three senders: floor(1.2) = 1 at each end, the middle one; two: floor(0.8) = 0, their mean; one: itself
    assert_close(got, moved_by([1, 4, 3, 2, -5, 0], [0, 10]))


def test_norm_bound_to_a_fixed_norm(tiny_model, make_conf):
    uploads = [handmade_upload(1, [[3, 4, 0, 0, 0, 0], [0, 0]]),  # norm 5: scaled to 1, [0.6, 0.8]
               handmade_upload(1, [[0.3, 0, 0, 0, 0, 0], [0, 0.4]])]  # norm 0.5: kept
    got = aggregated(tiny_model, make_conf, uploads, defense="norm_bound", clip_norm=1.0, aggregation="mean")
    assert_close(got, moved_by([0.45, 0.4, 0, 0, 0, 0], [0, 0.2]))


def test_norm_bound_to_a_multiple_of_the_median_norm_of_sparse_uploads(tiny_model, make_conf):
    uploads = [sparse(1, [1, 0, 0, 0, 0, 0], [0], [0, 0], []),  # norm 1
               sparse(1, [0, 2, 0, 0, 0, 0], [1], [0, 0], []),  # norm 2, the median: the bound is 2 * 2 = 4
               sparse(1, [6, 8, 0, 0, 0, 0], [0, 1], [0, 0], [])]  # norm 10 over what was sent: [2.4, 3.2]
    got = aggregated(tiny_model, make_conf, uploads, defense="norm_bound", clip_multiple=2.0)
    # masked_mean: w0 (1 + 2.4) / 2, w1 (2 + 3.2) / 2; nothing else was sent
    assert_close(got, moved_by([1.7, 2.6, 0, 0, 0, 0], [0, 0]))


def test_norm_bound_of_two_uploads_uses_the_smaller_norm(tiny_model, make_conf):
    uploads = [handmade_upload(1, [[1, 0, 0, 0, 0, 0], [0, 0]]), handmade_upload(1, [[0, 100, 0, 0, 0, 0], [0, 0]])]
    got = aggregated(tiny_model, make_conf, uploads, defense="norm_bound", aggregation="mean")
    # norms 1 and 100: the bound is 2 * 1, the boosted upload becomes [0, 2]
    assert_close(got, moved_by([0.5, 1, 0, 0, 0, 0], [0, 0]))


def test_geometric_median_of_two_agreeing_uploads_and_an_outlier(tiny_model, make_conf):
    """Points a, a, b with equal weights: Weiszfeld from the mean (a third of the way to b) leaves a fraction f of
    b - a, then f / (2 - f): 1/3, 1/5, 1/9, ..., 1 / (2^(i+1) + 1) after i iterations (the mean keeps 1/3)."""
    uploads = [handmade_upload(10, [[1] * 6, [1, 1]])] * 2 + [handmade_upload(10, [[66] * 6, [66, 66]])]
    got = aggregated(tiny_model, make_conf, uploads, defense="geometric_median")
    step = 1 + 65 / (2 ** (robust.WEISZFELD_ITERATIONS + 1) + 1)
    assert_close(got, moved_by([step] * 6, [step] * 2))
    assert robust.WEISZFELD_ITERATIONS == 5 and step == 2  # 65 = 2^6 + 1: a step of 1 + 1


def test_geometric_median_of_sparse_weighted_uploads_against_a_plain_loop(tiny_model, make_conf):
    got = aggregated(tiny_model, make_conf, SPARSE, defense="geometric_median")
    # what the server reconstructs of A, B, C (unsent = 0), weighted by their counts 1, 3, 2
    points = [[1, 2, 3, 0, 0, 0, 10, 0], [0, 6, 7, 8, 0, 0, 0, 40], [0, 0, -3, -4, -5, 0, -10, -20]]
    weights = [1, 3, 2]
    z = [sum(w * p[j] for w, p in zip(weights, points)) / sum(weights) for j in range(8)]
    for _ in range(robust.WEISZFELD_ITERATIONS):
        betas = [w / max(1e-6, math.sqrt(sum((z[j] - p[j]) ** 2 for j in range(8)))) for w, p in zip(weights, points)]
        z = [sum(b * p[j] for b, p in zip(betas, points)) / sum(betas) for j in range(8)]
    assert_close(got, moved_by(z[:6], z[6:]))


def test_a_defense_that_changes_nothing_leaves_the_run_bit_identical(make_conf, tmp_path):
    plain = federation.run(make_conf(), str(tmp_path / "plain"), False, InProcess)
    unclipped = federation.run(make_conf(defense="norm_bound", clip_norm=1e30), str(tmp_path / "bound"), False,
                               InProcess)
    assert without_seconds(unclipped) == without_seconds(plain)


# ---- attacks ------------------------------------------------------------------------------------------------------

def hand_moved(tiny_model):
    """tiny_model moved by a known diff: weight [1, -2, 0, 0, 0, 3], bias [0.5, -1]."""
    local = copy.deepcopy(tiny_model)
    with torch.no_grad():
        local.weight.add_(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]))
        local.bias.add_(torch.tensor([0.5, -1.0]))
    return local


def sent(make_conf, tiny_model, client_id, round_index, **settings):
    conf = make_conf(sparsifier="none", quantize="none", **settings)
    upload = Client(client_id, torch.arange(7), conf)._upload(hand_moved(tiny_model), tiny_model.state_dict(),
                                                              round_index, 0.0)
    count, _, values = codec.decode(upload.payload, [6, 2])
    return count, [v.tolist() for v in values]


@pytest.mark.parametrize("attack, expected", [
    ("scale", (7, [[10, -20, 0, 0, 0, 30], [5, -10]])),
    ("sign_flip", (7, [[-10, 20, 0, 0, 0, -30], [-5, 10]])),
    ("fill", (7, [[10] * 6, [10] * 2])),
    ("count", (MAX_COUNT, [[1, -2, 0, 0, 0, 3], [0.5, -1]])),
])
def test_attacks_by_hand(make_conf, tiny_model, attack, expected):
    settings = dict(attackers=1, attack=attack, attack_scale=10.0, attack_from=2)
    assert sent(make_conf, tiny_model, 0, 2, **settings) == expected
    honest = (7, [[1, -2, 0, 0, 0, 3], [0.5, -1]])
    assert sent(make_conf, tiny_model, 0, 1, **settings) == honest  # before attack_from
    assert sent(make_conf, tiny_model, 1, 2, **settings) == honest  # not one of the attackers
    assert sent(make_conf, tiny_model, 0, 3, **settings, attack_until=3) == expected  # its last round
    assert sent(make_conf, tiny_model, 0, 4, **settings, attack_until=3) == honest  # after it


def test_noise_attack_adds_seeded_noise_scaled_by_each_tensors_std(make_conf, tiny_model):
    settings = dict(attackers=1, attack="noise", attack_scale=3.0, seed=4)
    count, values = sent(make_conf, tiny_model, 0, 2, **settings)
    draw = torch.Generator().manual_seed(derive_seed(4, "attack", 2, 0))
    for got, diff in zip(values, ([1, -2, 0, 0, 0, 3], [0.5, -1])):
        mean = sum(diff) / len(diff)
        std = math.sqrt(sum((d - mean) ** 2 for d in diff) / len(diff))  # of the tensor, not of the model
        noise = torch.randn(len(diff), generator=draw).tolist()
        assert got == pytest.approx([d + 3.0 * std * n for d, n in zip(diff, noise)], abs=1e-5)
    assert count == 7
    assert sent(make_conf, tiny_model, 0, 2, **settings)[1] == values  # the same draw every time
    assert sent(make_conf, tiny_model, 0, 3, **settings)[1] != values  # another round, another draw


def test_an_attacker_keeps_an_honest_clients_residual(make_conf, tiny_model):
    stc = dict(sparsifier="topk", topk_scope="model", quantize="ternary", prop=0.25, error_feedback=True)
    attacker = Client(0, torch.arange(7), make_conf(**stc, attackers=1))
    honest = Client(0, torch.arange(7), make_conf(**stc))
    for round_index in (1, 2):
        payloads = [client._upload(hand_moved(tiny_model), tiny_model.state_dict(), round_index, 0.0).payload
                    for client in (attacker, honest)]
        assert payloads[0] != payloads[1]
        assert all(torch.equal(a, h) for a, h in zip(attacker.residual, honest.residual))
    # the boost went through the codec: the same positions and signs, a 100x ternary magnitude
    (_, kept_a, values_a), (_, kept_h, values_h) = (codec.decode(p, [6, 2]) for p in payloads)
    assert all(torch.equal(a, h) for a, h in zip(kept_a, kept_h))
    assert all(torch.allclose(a, 100 * h) for a, h in zip(values_a, values_h))


def test_attacked_runs_rerun_bit_identically_and_honest_runs_ignore_the_attack_keys(make_conf, tmp_path):
    def rows(name, **settings):
        return without_seconds(federation.run(make_conf(**settings), str(tmp_path / name), False, InProcess))
    noisy = dict(attackers=1, attack="noise", attack_scale=5.0)
    attacked = rows("noise", **noisy)
    assert rows("noise-again", **noisy) == attacked
    honest = rows("honest")
    assert attacked != honest
    assert rows("keys", attack="noise", attack_scale=5.0, attack_from=2) == honest


def test_registered_counts_leave_honest_runs_as_they_were(make_conf, tmp_path, monkeypatch):
    """Honest clients claim their share's size: cutting claims to it changes no bit."""
    conf = make_conf(sparsifier="topk", prop=0.1, error_feedback=True, aggregation="mean")
    bounded = federation.run(conf, str(tmp_path / "bounded"), False, InProcess)
    monkeypatch.setattr(federation, "Server", lambda model, conf, device, registered, validation:
                        Server(model, conf, device, validation=validation))
    unbounded = federation.run(conf, str(tmp_path / "unbounded"), False, InProcess)
    assert without_seconds(bounded) == without_seconds(unbounded)


# ---- configuration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(attackers=5), "error: config key 'attackers' (5) must not exceed 'no_models' (4)"),
    (dict(trim_fraction=0.5), "error: config key 'trim_fraction' must be < 0.5"),
    (dict(defense="krum"), "error: config key 'defense' must be one of none, norm_bound, median, trimmed_mean, "
                           "geometric_median"),
    (dict(attack_from=0), "error: config key 'attack_from' must be >= 1"),
    (dict(attack_from=3, attack_until=2), "error: config key 'attack_until' (2) is before 'attack_from' (3)"),
])
def test_impossible_settings_are_one_error_line(write_conf, run_main, tmp_path, settings, message):
    status, _, err = run_main("-c", write_conf(**settings), "--out", tmp_path / "run")
    assert status == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_plot_labels_leave_out_the_keys_of_other_defenses_and_of_absent_attackers():
    median = plot.unused_keys({**config.DEFAULTS, "defense": "median"})
    assert {"clip_norm", "clip_multiple", "trim_fraction", "attack", "attack_scale", "attack_from"} <= median
    attacked = plot.unused_keys({**config.DEFAULTS, "defense": "norm_bound", "attackers": 1})
    assert not {"clip_norm", "clip_multiple", "attack", "attack_scale", "attack_from"} & attacked
