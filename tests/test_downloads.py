"""Downloads: every client that applies the bytes it downloads holds the server's model bit for bit (its own replica
of the model, trained from), relay gives the dense run's results exactly, and the bytes are what the layout says."""
import collections
import copy
import math
import struct

import pytest
import torch

import codec
import downloads
import federation
import models
from conftest import read_csv, without_seconds
from engines.inprocess import InProcess
from server import Server

CPU = torch.device("cpu")
STC = {"sparsifier": "topk", "topk_scope": "model", "quantize": "ternary", "prop": 0.05, "error_feedback": True}


def bits(tensor):
    """A float tensor's bit patterns in logical order: equal bits, not merely equal values (-0.0 differs from 0.0)."""
    return tensor.detach().flatten().contiguous().view(torch.int32)


def assert_same_model(state, expected):
    for name, value in expected.items():
        if torch.is_floating_point(value):
            assert torch.equal(bits(state[name]), bits(value)), name
        else:
            assert torch.equal(state[name], value), name


def parse_sync(sync):
    """A sync's kind and parts, read with struct from the layout in codec/__init__.py (not with its decoder)."""
    kind = sync[0]
    if kind != 0:
        return kind, sync[1:]
    offset, rounds = 1, []
    (count,) = struct.unpack_from("<I", sync, offset)
    offset += 4
    for _ in range(count):
        (payloads,) = struct.unpack_from("<I", sync, offset)
        offset += 4
        message = []
        for _ in range(payloads):
            (length,) = struct.unpack_from("<I", sync, offset)
            message.append(sync[offset + 4:offset + 4 + length])
            offset += 4 + length
        rounds.append(message)
    assert offset == len(sync)
    return kind, rounds


class Replicas(InProcess):
    """Each client keeps its own model, moved only by the bytes it downloads, and trains from it (not from the
    server's); after every sync the test compares it with the server's model bit for bit."""

    def __init__(self, conf, dataset, shares, workspace, store, start_from_garbage=False):
        super().__init__(conf, dataset, shares, workspace, store)
        self.conf, self.initial = conf, copy.deepcopy(workspace)
        if start_from_garbage:  # a client that cannot know the initial model: its first sync must carry all of it
            with torch.no_grad():
                for value in self.initial.state_dict().values():
                    if torch.is_floating_point(value):
                        value.fill_(7.0)
        self.replicas, self.syncs_seen = {}, []

    def train(self, chosen, syncs, global_state, round_index, progress=None):
        uploads = []
        for client_id in chosen:
            replica = self.replicas.setdefault(client_id, Server(copy.deepcopy(self.initial), self.conf, CPU))
            downloads.apply_sync(syncs[client_id], replica, round_index - 1)
            assert_same_model(replica.global_state(), global_state)
            self.syncs_seen.append((round_index, client_id, syncs[client_id]))
            uploads.append(self.clients[client_id].local_train(self.workspace, replica.global_state(), self.dataset,
                                                               round_index))
        return uploads


def run_with(make_conf, tmp_path, name, transport=InProcess, **overrides):
    conf = make_conf(**overrides)
    made = []

    def factory(*args):
        made.append(transport(*args))
        return made[0]
    rows = federation.run(conf, str(tmp_path / name), False, factory)
    return rows, made[0]


@pytest.mark.parametrize("settings", [
    dict(download="relay", aggregation="masked_mean"),
    dict(download="relay", aggregation="lambda"),
    dict(download="compressed", aggregation="mean", server_momentum=0.5),
    dict(download="compressed", download_sparsifier="random", download_quantize="int8", aggregation="masked_mean"),
    dict(download="compressed", download_first_contact="dense", download_quantize="none"),
    dict(download="compressed", download_sparsifier="powersgd", download_quantize="int8", aggregation="mean"),
])
def test_every_client_holds_the_servers_model_after_its_sync(make_conf, tmp_path, settings):
    conf = dict(STC, no_models=5, k=2, global_epochs=8, **settings)
    rows, replicas = run_with(make_conf, tmp_path, "replicas", Replicas, **conf)
    expected, _ = run_with(make_conf, tmp_path, "inprocess", **conf)
    # clients that trained from their own replicas give exactly the in-process run, where they train from the server
    assert without_seconds(rows) == without_seconds(expected)
    last_seen, longest_absence = {}, 0
    for round_index, client, _ in replicas.syncs_seen:
        longest_absence = max(longest_absence, round_index - last_seen.get(client, 1))
        last_seen[client] = round_index
    assert longest_absence >= 3  # some client caught up after missing rounds


@pytest.mark.parametrize("defense", ["norm_bound", "median", "trimmed_mean", "geometric_median"])
def test_clients_replaying_relayed_uploads_apply_the_servers_defense(make_conf, tmp_path, defense):
    """Under relay a client moves its model by the round's uploads through the server's own aggregation, so a defense
    (here against a 100x booster, three uploads a round) must give it the server's model bit for bit."""
    conf = dict(STC, no_models=4, k=3, global_epochs=5, download="relay", defense=defense, attackers=1,
                attack="scale", attack_scale=100, trim_fraction=0.4)  # of three senders, trims one at each end
    rows, _ = run_with(make_conf, tmp_path, "replicas", Replicas, **conf)  # asserts inside, every sync
    expected, _ = run_with(make_conf, tmp_path, "inprocess", **conf)
    assert without_seconds(rows) == without_seconds(expected)
    undefended, _ = run_with(make_conf, tmp_path, "undefended", **{**conf, "defense": "none"})
    assert without_seconds(rows) != without_seconds(undefended)  # the defense changed the run


def small_batchnorm_net(input_shape, num_classes, pretrained=False):
    return torch.nn.Sequential(torch.nn.Conv2d(input_shape[0], 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, num_classes))


@pytest.mark.parametrize("download", ["relay", "compressed"])
def test_batchnorm_statistics_stay_in_sync_too(make_conf, tmp_path, monkeypatch, download):
    """BatchNorm running statistics travel as floats; its batch counter never travels and stays as built."""
    monkeypatch.setattr(models, "build", lambda name, shape, classes, pretrained=False, input_dtype=None:
                        small_batchnorm_net(shape, classes))
    conf = dict(STC, no_models=3, k=2, global_epochs=4, download=download)
    rows, replicas = run_with(make_conf, tmp_path, "replicas", Replicas, **conf)
    expected, _ = run_with(make_conf, tmp_path, "inprocess", **conf)
    assert without_seconds(rows) == without_seconds(expected)
    assert "1.running_var" in replicas.initial.state_dict()


def test_a_client_that_cannot_know_the_initial_model_is_sent_all_of_it(make_conf, tmp_path):
    conf = dict(STC, no_models=4, k=2, global_epochs=4, download="compressed", download_first_contact="dense")
    federation.run(make_conf(**conf), str(tmp_path / "r"), False,
                   lambda *args: Replicas(*args, start_from_garbage=True))  # asserts inside, every sync


def test_relay_gives_the_dense_runs_results_exactly(make_conf, tmp_path):
    dense, _ = run_with(make_conf, tmp_path, "dense", **STC, global_epochs=5)
    relay, _ = run_with(make_conf, tmp_path, "relay", **STC, global_epochs=5, download="relay")
    columns = ("accuracy", "loss", "train_loss", "upload_bytes", "clients", "refused")
    assert [{c: r[c] for c in columns} for r in relay] == [{c: r[c] for c in columns} for r in dense]
    assert sum(r["download_bytes"] for r in relay) < sum(r["download_bytes"] for r in dense) / 10


def test_dense_download_is_the_f32_model_per_sampled_client(make_conf, tmp_path):
    rows, _ = run_with(make_conf, tmp_path, "dense", global_epochs=2)
    numels = sum(p.numel() for p in models.build("cnn", (1, 16, 16), 10).state_dict().values())  # all float here
    for row in rows:
        assert row["download_bytes"] == 2 * (11 + 4 * numels)
        assert (row["syncs_dense"], row["syncs_replay"], row["syncs_changed"]) == (2, 0, 0)


def test_with_every_client_sampled_each_receives_the_previous_rounds_message(make_conf, tmp_path):
    conf = dict(STC, no_models=3, k=3, global_epochs=4, download="compressed")
    rows, replicas = run_with(make_conf, tmp_path, "all", Replicas, **conf)
    by_round = {}
    for round_index, client, sync in replicas.syncs_seen:
        by_round.setdefault(round_index, []).append(sync)
    assert by_round[1] == [b"", b"", b""]  # the initial model comes from the seed: nothing to download
    for round_index in (2, 3, 4):
        syncs = by_round[round_index]
        assert len(set(syncs)) == 1  # the same message for everyone
        kind, rounds = parse_sync(syncs[0])
        assert kind == 0 and len(rounds) == 1 and len(rounds[0]) == 1  # one round's message, one payload
        assert len(syncs[0]) == 1 + 4 + 4 + 4 + len(rounds[0][0])
        assert rows[round_index - 1]["download_bytes"] == 3 * len(syncs[0])
        assert rows[round_index - 1]["syncs_replay"] == 3


def test_first_contact_dense_charges_the_dense_model_once_per_client(make_conf, tmp_path):
    conf = dict(STC, no_models=5, k=2, global_epochs=6, download="compressed", download_first_contact="dense")
    rows, replicas = run_with(make_conf, tmp_path, "first", Replicas, **conf)
    numels = replicas.replicas[next(iter(replicas.replicas))].numels
    dense = 11 + 4 * sum(numels)
    first = {}
    for round_index, client, sync in replicas.syncs_seen:
        first.setdefault(client, sync)
        assert len(sync) <= 1 + dense  # no sync costs more than the dense model (and the byte that says so)
    assert all(sync[0] == 2 and len(sync) == 1 + dense for sync in first.values())


def test_a_client_further_behind_than_the_log_gets_changed_entries_or_the_dense_model(make_conf):
    conf = make_conf(sparsifier="none", download="compressed", download_sparsifier="none", download_quantize="none")
    server = Server(models.build("cnn", (1, 16, 16), 10), conf, CPU)
    replica = Server(copy.deepcopy(server.model), conf, CPU)
    dense = codec.dense_size(server.numels)
    torch.manual_seed(0)
    for _ in range(3):  # each round's message is a dense delta: the log can hold none beyond the newest
        upload = codec.encode({"sparsifier": "none", "quantize": "none"},
                              [torch.randn(n) * 1e-3 for n in server.numels], 10).payload
        assert server.receive(upload) is None
        assert server.aggregate() is None
        assert server.syncs.log_bytes <= dense
    assert not server.syncs.log  # a dense delta and its framing cost more than the model: not worth keeping
    sync, kind = server.sync(client_id=0)
    assert kind in ("changed", "dense") and len(sync) <= 1 + dense
    downloads.apply_sync(sync, replica, server.syncs.version)
    assert_same_model(replica.global_state(), server.global_state())


def test_changed_entries_sync_by_hand(tiny_model, make_conf):
    """Only entry 4 of the weight and the bias's entry 1 change: the sync carries them and their new values."""
    conf = make_conf(download="relay", download_first_contact="seed")
    server = Server(tiny_model, conf, CPU)
    replica = Server(copy.deepcopy(tiny_model), conf, CPU)
    with torch.no_grad():  # changed by hand, with no round logged: a replay is impossible
        server.globals[0].view(-1)[4] = 50.0
        server.globals[1][1] = -0.25
    server.syncs.version = 1
    server.syncs.last_changed[0][4] = 1
    server.syncs.last_changed[1][1] = 1
    sync, kind = server.sync(client_id=3)
    header = struct.pack("<BBBII", 2, 2, 0, 0, 2)  # version 2, top-k positions, f32 values, 0 samples, 2 tensors
    positions = struct.pack("<BI", 0, 2) + bytes([0b00001001])  # a bitmap of flat positions 4 and 6 + 1
    values = struct.pack("<2f", 50.0, -0.25)
    assert kind == "changed" and sync == bytes([1]) + header + positions + values
    downloads.apply_sync(sync, replica, server.syncs.version)
    assert replica.flat_globals()[0].tolist() == [1, 2, 3, 4, 50, 6]
    assert replica.flat_globals()[1].tolist() == [0.5, -0.25]


@pytest.mark.parametrize("sync", [
    bytes([9]),  # unknown kind
    bytes([0]) + struct.pack("<I", 2**31),  # claims 2^31 rounds in no bytes
    bytes([0]) + struct.pack("<II", 1, 1000),  # one round claiming 1000 payloads
    bytes([0]) + struct.pack("<III", 1, 1, 10**9) + b"abc",  # a payload claiming a gigabyte
    bytes([0]) + struct.pack("<II", 1, 0) + b"x",  # bytes after the last round
])
def test_hostile_syncs_are_refused_before_anything_is_built(sync):
    with pytest.raises(codec.PayloadError):
        codec.decode_sync(sync, most_rounds=2**32)


def test_relay_with_server_momentum_is_one_error_line(write_conf, run_main, tmp_path):
    status, out, err = run_main("-c", write_conf(download="relay", server_momentum=0.5), "--out", tmp_path / "r")
    assert status == 2 and err.startswith("error: download 'relay' cannot be used with server_momentum")
    assert len(err.strip().splitlines()) == 1


def test_resume_continues_a_compressed_download_exactly(write_conf, run_main, tmp_path):
    conf = write_conf(**STC, global_epochs=6, download="compressed", server_momentum=0.5)
    assert run_main("-c", conf, "--out", tmp_path / "whole")[0] == 0
    assert run_main("-c", conf, "--set", "global_epochs=3", "--out", tmp_path / "split")[0] == 0
    assert run_main("-c", conf, "--out", tmp_path / "split", "--resume")[0] == 0
    whole, split = read_csv(tmp_path / "whole" / "metrics.csv"), read_csv(tmp_path / "split" / "metrics.csv")
    assert without_seconds(split) == without_seconds(whole)
    assert sum(int(r["download_bytes"]) for r in whole) > 0


def test_a_round_that_kept_the_model_replays_as_nothing(make_conf):
    """A compressed download logs a refused round (every upload rejected) as an empty message: a client that missed
    it replays it as no move, not as an error."""
    # top-k 4% of the step, ternary: a message far smaller than the model
    conf = make_conf(sparsifier="none", download="compressed")
    server = Server(models.build("cnn", (1, 16, 16), 10), conf, CPU)
    replica = Server(copy.deepcopy(server.model), conf, CPU)
    upload = codec.encode({"sparsifier": "none", "quantize": "none"}, [torch.randn(n) * 1e-3 for n in server.numels],
                          10).payload
    assert server.aggregate() == "no upload was accepted"
    assert server.receive(upload) is None and server.aggregate() is None
    sync, kind = server.sync(client_id=0)
    assert kind == "replay" and parse_sync(sync)[1][0] == []
    downloads.apply_sync(sync, replica, server.syncs.version)
    assert_same_model(replica.global_state(), server.global_state())


@pytest.mark.parametrize("download", ["relay", "compressed"])
def test_every_client_holds_the_servers_model_through_a_rollback(make_conf, tmp_path, capsys, download):
    """Client 0 boosts its upload 1e30 times from round 3: each round it is sampled in is rolled back, and is logged
    as an empty message that clients replay as no move."""
    conf = dict(STC, no_models=4, k=2, global_epochs=8, download=download, attackers=1, attack_scale=1e30,
                attack_from=3)
    rows, replicas = run_with(make_conf, tmp_path, "replicas", Replicas, **conf)  # asserts inside, every sync
    refused = [row["round"] for row in rows if row["refused"]]
    assert refused and all(row["round"] >= 3 and "0" in row["clients"].split() for row in rows if row["refused"])
    assert capsys.readouterr().err.count("rolled back: the validation loss after it was not finite") == len(refused)
    replayed_empty = [(round_index, client) for round_index, client, sync in replicas.syncs_seen
                      if sync and sync[0] == 0 and [] in parse_sync(sync)[1]]
    assert replayed_empty  # some client replayed a rolled-back round
    expected, _ = run_with(make_conf, tmp_path, "inprocess", **conf)
    assert without_seconds(rows) == without_seconds(expected)


def test_a_relay_forwards_the_example_count_the_server_used(make_conf, tmp_path):
    """Client 0 claims 2^32-1 examples; the server weighs it by its share, and so does every client replaying it."""
    conf = dict(STC, no_models=4, k=2, global_epochs=4, download="relay")
    rows, _ = run_with(make_conf, tmp_path, "replicas", Replicas, **conf, attackers=1, attack="count")  # asserts inside
    honest, _ = run_with(make_conf, tmp_path, "honest", **conf)
    assert without_seconds(rows) == without_seconds(honest)


@pytest.mark.parametrize("method", [dict(download_sparsifier="powersgd", download_quantize="int8"),
                                    dict(download_sparsifier="topk", download_quantize="ternary")],
                         ids=["powersgd int8", "topk ternary"])
def test_a_step_whose_message_cannot_code_it_keeps_the_model(make_conf, capsys, method):
    """One upload of 1e37 in every entry is finite, so it is accepted; the server's step is 1e37 / 2. PowerSGD's M Q
    then overflows (each row of the second conv sums 288 such products), and the int8 scale of its NaN factors is NaN;
    ternary's one magnitude, the f32 mean of the 4% kept (6053 of them), overflows to Inf. Either message is one the
    decoder refuses: the round keeps the model, as a non-finite step does, and the run goes on (it raised
    PayloadError out of aggregate)."""
    conf = make_conf(sparsifier="none", download="compressed", aggregation="mean", **method)
    server = Server(models.build("cnn", (1, 16, 16), 10), conf, CPU)
    before = [t.clone() for t in server.flat_globals()]
    hostile = codec.encode({"sparsifier": "none", "quantize": "none"}, [torch.full((n,), 1e37) for n in server.numels],
                           10).payload
    honest = codec.encode({"sparsifier": "none", "quantize": "none"}, [torch.zeros(n) for n in server.numels],
                          10).payload
    assert server.receive(hostile) is None and server.receive(honest) is None
    assert server.aggregate(1) == "the aggregate would make the global model non-finite, so the model was kept"
    assert all(torch.equal(a, b) for a, b in zip(server.flat_globals(), before))
    assert server.download.residual is None and server.download.memory is None  # nothing committed
    honest_step = codec.encode({"sparsifier": "none", "quantize": "none"},
                               [torch.full((n,), 1e-3) for n in server.numels], 10).payload
    assert server.receive(honest_step) is None and server.aggregate(2) is None  # the next round moves


def dense_sync(values, kind=codec.DENSE):
    """A dense sync of nn.Linear(3, 2) written by hand: kind, then a dense f32 payload of weight and bias."""
    return bytes([kind]) + struct.pack("<BBBII", 2, 0, 0, 0, 2) + struct.pack("<8f", *values)


@pytest.mark.parametrize("download", ["relay", "compressed"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_sync_holding_nan_or_inf_is_refused_and_the_replica_kept(tiny_model, make_conf, download, bad):
    replica = Server(tiny_model, make_conf(download=download), CPU)
    before = [t.clone() for t in replica.flat_globals()]
    with pytest.raises(codec.PayloadError, match="the sync holds NaN or Inf"):
        downloads.apply_sync(dense_sync([1.0] * 7 + [bad]), replica, rounds_played=1)
    changed = bytes([codec.CHANGED]) + struct.pack("<BBBII", 2, 2, 0, 0, 2) + struct.pack("<BIB", 1, 1, 7) \
        + struct.pack("<f", bad)  # entry 7, the bias's second, as a u8 index list
    with pytest.raises(codec.PayloadError, match="the sync holds NaN or Inf"):
        downloads.apply_sync(changed, replica, rounds_played=1)
    assert all(torch.equal(a, b) for a, b in zip(replica.flat_globals(), before))


def test_a_compressed_round_message_holding_nan_is_refused(tiny_model, make_conf):
    """A round message of the download's method (here dense f32) whose step is NaN: the replica's move refuses it."""
    conf = make_conf(download="compressed", download_sparsifier="none", download_quantize="none")
    replica = Server(tiny_model, conf, CPU)
    message = struct.pack("<BBBII", 2, 0, 0, 0, 2) + struct.pack("<8f", *[math.nan] * 8)
    with pytest.raises(codec.PayloadError, match="a round's step does not apply"):
        downloads.apply_sync(codec.encode_sync(codec.REPLAY, [[message]]), replica, rounds_played=1)


def test_a_replay_of_more_rounds_than_were_played_is_refused(tiny_model, make_conf):
    replica = Server(tiny_model, make_conf(download="relay"), CPU)
    sync = codec.encode_sync(codec.REPLAY, [[]] * 3)
    with pytest.raises(codec.PayloadError, match="a replay of 3 rounds, where 2 have been played"):
        downloads.apply_sync(sync, replica, rounds_played=2)
    downloads.apply_sync(sync, replica, rounds_played=3)


def test_replayed_rounds_that_kept_the_model_cost_no_aggregate(tiny_model, make_conf, monkeypatch):
    """1000 empty rounds (4 kB) each made the sums of a round on the whole model: 15.8 s on ResNet-18."""
    replica = Server(tiny_model, make_conf(download="relay"), CPU)
    calls = []
    monkeypatch.setattr(Server, "aggregate", lambda self, *args: calls.append(args))
    downloads.apply_sync(codec.encode_sync(codec.REPLAY, [[]] * 1000), replica, rounds_played=1000)
    assert calls == []


def test_restoring_a_message_log_checks_each_message_as_the_download_decodes_it(tiny_model, make_conf):
    """A checkpoint's log of round messages is decoded with the download's method on resume: a NaN step, or a message
    of another method, is refused there rather than replayed into a client's model later."""
    conf = make_conf(download="compressed", download_sparsifier="none", download_quantize="none")
    server = Server(tiny_model, conf, CPU)
    step = struct.pack("<BBBII", 2, 0, 0, 0, 2) + struct.pack("<8f", *[0.5] * 8)
    state = {"version": 1, "synced": {0: 1}, "log": [(1, [step])], "last_changed": server.syncs.last_changed}
    server.syncs.restore(state, server.download.method)
    assert server.syncs.log == collections.deque([(1, [step])])
    nan_step = step[:-4] + struct.pack("<f", math.nan)
    with pytest.raises(ValueError, match="round 1's message holds NaN or Inf"):
        server.syncs.restore({**state, "log": [(1, [nan_step])]}, server.download.method)
    sparse = struct.pack("<BBBII", 2, 2, 0, 0, 2) + struct.pack("<BIB", 1, 1, 7) + struct.pack("<f", 0.5)  # top-k
    with pytest.raises(codec.PayloadError, match="sparsifier topk and quantize none, where this run's are none and"):
        server.syncs.restore({**state, "log": [(1, [sparse])]}, server.download.method)
    with pytest.raises(ValueError, match="round 2 of 1"):
        server.syncs.restore({**state, "log": [(2, [step])]}, server.download.method)
