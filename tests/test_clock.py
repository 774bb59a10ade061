"""The simulated clock (clock.py): a client's time is the formula, checked by hand; the clock changes no other metric;
deadlines and over-selection keep and drop the clients they should; sampling draws among the online; a dropped
client keeps its whole diff; re-timing equals a run made with the other profile; bad profiles are one line."""
import math

import numpy as np
import pytest
import torch
from conftest import read_csv

import clock
from client import Client
from utils import retime, run_files

TIME_COLUMNS = set(run_files.TIME_COLUMNS)


def write_profile(path, rows, header="client,uplink_mbps,downlink_mbps,latency_ms,slowness,availability"):
    path.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return str(path)


def without(rows, columns):
    return [{key: value for key, value in row.items() if key not in columns} for row in rows]


def test_a_clients_time_is_the_formula(write_conf, tmp_path, run_main):
    """4 clients of 500 examples (3000 synthetic, 1000 held by the server), batch 64: ceil(500 / 64) = 8 steps.
    Client c: uplink 2 + c Mbit/s, downlink 8 Mbit/s, latency 20 ms, slowness 1.5, step 0.05 s."""
    profile = write_profile(tmp_path / "p.csv", [(c, 2 + c, 8, 20, 1.5, 1) for c in range(4)])
    out = tmp_path / "run"
    status, _, err = run_main("-c", write_conf(clock="simulated", profile=profile, step_seconds=0.05), "--out", out)
    assert status == 0, err
    metrics, clients = read_csv(out / "metrics.csv"), read_csv(out / "clients.csv")
    assert len(clients) == 2 * 3
    for row in clients:
        c, down, up = int(row["client"]), int(row["download_bytes"]), int(row["upload_bytes"])
        assert int(row["steps"]) == 8
        assert float(row["download_s"]) == pytest.approx(down * 8 / 8e6 + 0.020, abs=1e-6)
        assert float(row["compute_s"]) == pytest.approx(8 * 0.05 * 1.5, abs=1e-6)
        assert float(row["upload_s"]) == pytest.approx(up * 8 / ((2 + c) * 1e6) + 0.020, abs=1e-6)
        assert float(row["finish_s"]) == pytest.approx(float(row["download_s"]) + 0.6 + float(row["upload_s"]),
                                                       abs=2e-6)
    elapsed = 0.0
    for metric in metrics:  # a round waits for its slowest client; the bytes are the metrics' own
        mine = [row for row in clients if row["round"] == metric["round"]]
        assert " ".join(row["client"] for row in mine) == metric["clients"]
        assert sum(int(row["upload_bytes"]) for row in mine) == int(metric["upload_bytes"])
        assert sum(int(row["download_bytes"]) for row in mine) == int(metric["download_bytes"])
        assert float(metric["round_seconds"]) == max(float(row["finish_s"]) for row in mine)
        elapsed += float(metric["round_seconds"])
        assert float(metric["sim_seconds"]) == pytest.approx(elapsed, abs=1e-5)
        assert metric["dropped"] == "0"


@pytest.mark.parametrize("extra", [{"profile": "mobile"}, {"profile": "mixed", "error_feedback": True,
                                                           "sparsifier": "topk", "prop": 0.1}])
def test_the_clock_changes_no_other_metric(write_conf, tmp_path, run_main, extra):
    runs = {}
    for clock_name in ("none", "simulated"):
        overrides = {key: value for key, value in extra.items() if clock_name == "simulated" or key != "profile"}
        out = tmp_path / clock_name
        assert run_main("-c", write_conf(clock=clock_name, **overrides), "--out", out)[0] == 0
        runs[clock_name] = read_csv(out / "metrics.csv")
    assert set(runs["simulated"][0]) - set(runs["none"][0]) == TIME_COLUMNS
    assert without(runs["simulated"], TIME_COLUMNS | {"seconds"}) == without(runs["none"], {"seconds"})
    assert not (tmp_path / "none" / "clients.csv").exists()


class Fixed:
    """Profiles whose clients finish at the given seconds: all of it upload time, at 8 Mbit/s (a byte a
    microsecond), no latency."""

    def __init__(self, finishes):
        self.profiles = clock.Profiles(np.full(len(finishes), 8.0), np.full(len(finishes), 8.0),
                                       np.zeros(len(finishes)), np.ones(len(finishes)), np.ones(len(finishes)))
        self.records = [(c, 0, 0, int(f * 1e6)) for c, f in enumerate(finishes)]

    def play(self, keep, deadline=0.0, round_index=1):
        conf = {"seed": 0, "step_seconds": 0.01, "deadline": deadline}
        timings, seconds = clock.play(self.profiles, conf, round_index, self.records, keep)
        return [t.client for t in timings if t.arrived], seconds


def test_deadline_and_over_selection_keep_whom_they_should():
    round_ = Fixed([3.0, 1.0, 2.0])
    assert round_.play(keep=3) == ([0, 1, 2], 3.0)  # wait for all
    assert round_.play(keep=2) == ([1, 2], 2.0)  # over-selection: the first two, the round ends with the second
    assert round_.play(keep=3, deadline=2.5) == ([1, 2], 2.5)  # one missed the deadline: the round waited for it
    assert round_.play(keep=1, deadline=2.5) == ([1], 1.0)
    assert round_.play(keep=3, deadline=0.5) == ([], 0.5)  # none made it
    assert round_.play(keep=3, deadline=3.0) == ([0, 1, 2], 3.0)  # finishing at the deadline is in time


def test_ties_are_broken_by_a_seeded_order():
    tied = Fixed([1.0, 1.0, 1.0, 1.0])
    winners = [tied.play(keep=1, round_index=r)[0] for r in range(1, 41)]
    assert winners == [tied.play(keep=1, round_index=r)[0] for r in range(1, 41)]  # the same every time
    assert len({tuple(w) for w in winners}) == 4  # and not always the same client


def test_over_selection_samples_ceil_of_k_times_its_factor():
    def sampled(k, factor, clients=20):
        conf = {"k": k, "over_select": factor, "no_models": clients}
        return clock.Clock.sampled(type("C", (), {"conf": conf})())
    assert sampled(2, 1.3) == 3 and sampled(10, 1.1) == 11 and sampled(10, 1.0) == 10 and sampled(10, 3.0) == 20


def test_a_deadline_drops_late_clients_and_counts_their_bytes(write_conf, tmp_path, run_main):
    """Client 3's uplink is 1000 times slower than the others': under a deadline between them, it never arrives."""
    profile = write_profile(tmp_path / "p.csv", [(c, 0.01 if c == 3 else 10, 100, 0, 1, 1) for c in range(4)])
    out = tmp_path / "run"
    conf = write_conf(clock="simulated", profile=profile, deadline=5.0, global_epochs=6, error_feedback=True,
                      sparsifier="topk", prop=0.1)
    assert run_main("-c", conf, "--out", out)[0] == 0
    metrics, clients = read_csv(out / "metrics.csv"), read_csv(out / "clients.csv")
    assert {row["arrived"] for row in clients if row["client"] == "3"} == {"0"}
    assert {row["arrived"] for row in clients if row["client"] != "3"} == {"1"}
    for metric in metrics:
        mine = [row for row in clients if row["round"] == metric["round"]]
        late = [row for row in mine if row["client"] == "3"]
        assert metric["clients"] == " ".join(row["client"] for row in mine if row["client"] != "3")
        assert int(metric["dropped"]) == len(late)
        assert int(metric["dropped_upload_bytes"]) == sum(int(row["upload_bytes"]) for row in late)
        assert int(metric["dropped_download_bytes"]) == sum(int(row["download_bytes"]) for row in late)
        assert float(metric["round_seconds"]) == (5.0 if late else max(float(r["finish_s"]) for r in mine))
    assert any(row["client"] == "3" for row in clients)  # so the checks above checked a drop


def test_a_deadline_no_client_meets_ends_the_run_with_exit_1(write_conf, tmp_path, run_main):
    status, _, err = run_main("-c", write_conf(clock="simulated", deadline=0.001), "--out", tmp_path / "run")
    assert status == 1
    assert "no upload arrived in time: the deadline is 0.001 s" in err and "no round of" in err
    assert "Traceback" not in err


def test_a_dropped_client_keeps_its_whole_diff(synthetic, make_conf, tiny_model):
    """With error feedback, a kept upload leaves diff - sent as the residual; a dropped one, all of the diff."""
    from models import build
    conf = make_conf(clock="simulated", over_select=2.0, error_feedback=True, sparsifier="topk", prop=0.1,
                     residual_decay=0.5)
    torch.manual_seed(0)
    model = build("cnn", synthetic.input_shape, synthetic.num_classes)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    client = Client(0, torch.arange(200), conf)
    client.local_train(model, state, synthetic, 1)
    diffs = [(model.state_dict()[name] - state[name]).flatten() for name in state
             if torch.is_floating_point(state[name])]
    kept_residual = client.residual
    assert any((r != d * 0.5).any() for r, d in zip(kept_residual, diffs))  # what was sent left the residual
    # if the server discards the upload (engines' drop), the client keeps the whole diff instead
    assert all(torch.allclose(r, d * 0.5, atol=1e-7) for r, d in zip(client.residual_if_dropped, diffs))


def test_sampling_draws_among_the_online(write_conf, tmp_path, run_main):
    """Client 2 is never online and client 1 half the time: 60 rounds never sample client 2, and sample client 1
    less often than clients 0 and 3."""
    profile = write_profile(tmp_path / "p.csv", [(0, 10, 10, 10, 1, 1), (1, 10, 10, 10, 1, 0.5),
                                                 (2, 10, 10, 10, 1, 0), (3, 10, 10, 10, 1, 1)])
    out = tmp_path / "run"
    conf = write_conf(clock="simulated", profile=profile, global_epochs=60, no_models=4, k=2, batch_size=500)
    assert run_main("-c", conf, "--out", out)[0] == 0
    sampled = [row["client"] for row in read_csv(out / "clients.csv")]
    assert sampled.count("2") == 0
    assert 0 < sampled.count("1") < min(sampled.count("0"), sampled.count("3"))


def test_presets_are_seeded_and_have_their_stated_medians():
    a = clock.Profiles.preset("mobile", 100_000, 0, 1.0)
    b = clock.Profiles.preset("mobile", 100_000, 0, 1.0)
    assert np.array_equal(a.uplink, b.uplink) and not np.array_equal(a.uplink, clock.Profiles.preset(
        "mobile", 100_000, 1, 1.0).uplink)
    wifi = clock.Profiles.preset("wifi", 100_000, 0, 1.0)
    assert np.median(wifi.uplink) == pytest.approx(40e6, rel=0.02)
    assert np.median(wifi.downlink) == pytest.approx(90e6, rel=0.02)
    assert np.median(a.latency) == pytest.approx(0.030, rel=0.02)
    # the slow tail, by hand: 80% of uplinks are 10 Mbit/s * e^(0.8 z), 20% are 2 Mbit/s * e^(0.8 z)
    below_4 = 0.8 * normal_cdf(math.log(0.4) / 0.8) + 0.2 * normal_cdf(math.log(2.0) / 0.8)
    assert np.mean(a.uplink < 4e6) == pytest.approx(below_4, abs=0.005)
    assert sum(x.nbytes for x in (a.uplink, a.downlink, a.latency, a.slowness, a.availability)) <= 10e6


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("rows, header, message", [
    ([(0, 10, 10, 10, 1, 1)] * 1, None, "no row for client 1"),
    ([(c, 10, 10, 10, 1, 1, 5) for c in range(4)], None, "7 cells, expected 6"),
    ([(c, 10, 10, 10, 1, 1) for c in range(4)], "client,up,down,latency,slowness,availability", "the header must be"),
    ([(c, "fast", 10, 10, 1, 1) for c in range(4)], None, "uplink_mbps 'fast' is not a number"),
    ([(c, 0 if c == 2 else 10, 10, 10, 1, 1) for c in range(4)], None, "uplink_mbps must be a number from 1e-06 to 1e+09, got '0'"),
    ([(c, 10, -1, 10, 1, 1) for c in range(4)], None, "downlink_mbps must be a number from 1e-06 to 1e+09, got '-1'"),
    ([(c, 10, "nan", 10, 1, 1) for c in range(4)], None, "downlink_mbps must be a number from 1e-06 to 1e+09, got 'nan'"),
    ([(c, "inf", 10, 10, 1, 1) for c in range(4)], None, "uplink_mbps must be a number from 1e-06 to 1e+09, got 'inf'"),
    ([(c, 10, 10, 10, 1, 1.5) for c in range(4)], None, "availability must be a number from 0 to 1"),
    ([(c % 3, 10, 10, 10, 1, 1) for c in range(4)], None, "client 0 appears twice"),
    ([(c + 1, 10, 10, 10, 1, 1) for c in range(4)], None, "client 4 is not one of the run's 4"),
    ([(c, "1e-320", 10, 10, 1, 1) for c in range(4)], None, "uplink_mbps must be a number from 1e-06"),  # inf seconds
    ([(c, 10, 10, 10, "1e300", 1) for c in range(4)], None, "slowness must be a number from 1e-06 to 1e+06"),
    ([], None, "has no row for client 0"),
    ([(0, 10, 10, 10, 1, 1)], "client," * 200_000, "line 1 is longer than 1000 characters"),  # bounded memory
])
def test_a_bad_profile_csv_is_one_line(write_conf, tmp_path, run_main, rows, header, message):
    """Each refused before any data is loaded or anything proportional to no_models is allocated."""
    path = tmp_path / "p.csv"
    if header:
        write_profile(path, rows, header)
    else:
        write_profile(path, rows)
    status, _, err = run_main("-c", write_conf(clock="simulated", profile=str(path)), "--out", tmp_path / "run")
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"deadline": 10.0}, "'deadline' acts only on the simulated clock"),
    ({"profile": "wifi"}, "'profile' acts only on the simulated clock"),
    ({"clock": "simulated", "profile": "5g"}, "cannot read profile 5g"),
    ({"clock": "simulated", "over_select": 0.5}, "'over_select' must be >= 1"),
    ({"clock": "simulated", "step_seconds": 0}, "'step_seconds' must be > 0"),
    ({"clock": "simulated", "availability": 1.5}, "'availability' must be >= 0 and <= 1"),
    ({"clock": "simulated", "deadline": float("nan")}, "'deadline' must be >= 0"),
    ({"clock": "simulated", "over_select": 1e308}, "'over_select' must be >= 1 and <= 1000000.0"),
    ({"clock": "simulated", "step_seconds": 1e307}, "'step_seconds' must be > 0 and <= 1000000.0"),
    ({"clock": "simulated", "profile": "/nonexistent/p.csv", "availability": 0.5}, "leave the key 'availability' at 1"),
    ({"clock": "simulated", "no_models": 10**11, "k": 2}, "cannot read profile"),
])
def test_bad_clock_keys_are_one_line(write_conf, tmp_path, run_main, overrides, message):
    if overrides.get("no_models"):  # a preset for 10^11 clients is never drawn before the data says it cannot be
        overrides = {**overrides, "profile": "mobile"}
        message = "server_validation 1000 leaves"
    status, _, err = run_main("-c", write_conf(**overrides), "--out", tmp_path / "run")
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_retiming_equals_a_run_made_with_the_other_profile(write_conf, tmp_path, run_main):
    runs = {}
    for profile in ("mobile", "wifi"):
        out = tmp_path / profile
        assert run_main("-c", write_conf(clock="simulated", profile=profile), "--out", out)[0] == 0
        runs[profile] = out
    assert retime.main([str(runs["mobile"]), "--profile", "wifi", "--out", str(tmp_path / "retimed")]) == 0
    made, retimed = (read_csv(runs["wifi"] / "metrics.csv"), read_csv(tmp_path / "retimed" / "metrics.csv"))
    assert retimed == [{**row, "seconds": mobile["seconds"]} for row, mobile in
                       zip(made, read_csv(runs["mobile"] / "metrics.csv"))]
    assert read_csv(tmp_path / "retimed" / "clients.csv") == read_csv(runs["wifi"] / "clients.csv")
    assert read_csv(runs["mobile"] / "metrics.csv")[-1]["sim_seconds"] != made[-1]["sim_seconds"]


def test_retiming_refuses_a_run_whose_clients_depended_on_its_profile(write_conf, tmp_path, run_main, capsys):
    out = tmp_path / "run"
    assert run_main("-c", write_conf(clock="simulated", over_select=1.5), "--out", out)[0] == 0
    assert retime.main([str(out), "--profile", "wifi"]) == 2
    assert "could drop clients" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert run_main("-c", write_conf(), "--out", plain)[0] == 0
    assert retime.main([str(plain), "--profile", "wifi"]) == 2
    assert "without the simulated clock" in capsys.readouterr().err


# ---- FedBuff (mode async) -----------------------------------------------------------------------------------------

def test_fedbuff_takes_uploads_in_order_of_arrival_weighted_by_staleness(write_conf, tmp_path, run_main):
    """3 clients, all training at once, one upload per step; links so fast that a client's time is its compute:
    11 steps of 1/11 s times slowness 1, 2.5 and 4.2. By hand: client 0 arrives at 1 s (started at 0, no step taken
    since: staleness 0) and starts again, arriving at 2 s (staleness 0), again at 3 s; client 1, started at 0, arrives
    at 2.5 s after 2 steps (staleness 2); client 0 at 3 s (started after step 2, one step since), at 4 s (0)."""
    profile = write_profile(tmp_path / "p.csv", [(0, 1e6, 1e6, 0, 1, 1), (1, 1e6, 1e6, 0, 2.5, 1),
                                                 (2, 1e6, 1e6, 0, 4.2, 1)])
    out = tmp_path / "run"
    conf = write_conf(clock="simulated", profile=profile, step_seconds=1 / 11, mode="async", no_models=3,
                      concurrency=3, buffer_size=1, global_epochs=5)
    status, _, err = run_main("-c", conf, "--out", out)
    assert status == 0, err
    metrics = read_csv(out / "metrics.csv")
    assert [row["clients"] for row in metrics] == ["0", "0", "1", "0", "0"]
    assert [float(row["sim_seconds"]) for row in metrics] == pytest.approx([1, 2, 2.5, 3, 4], abs=1e-3)
    assert [float(row["staleness"]) for row in metrics] == [0, 0, 2, 1, 0]
    starts = [float(row["start_s"]) for row in read_csv(out / "clients.csv")]
    assert starts == pytest.approx([0, 1, 0, 2, 3], abs=1e-3)


def test_a_stale_upload_is_weighted_by_its_staleness(tiny_model, make_conf):
    """Two dense uploads of 1 and 3 from 10 and 30 examples, scaled 1 and 1/sqrt(3): masked_mean moves every entry
    by (10 * 1 + 30 * 3 / sqrt(3)) / 40."""
    from conftest import handmade_upload, lenient

    from server import Server
    server = lenient(Server(tiny_model, make_conf(), torch.device("cpu")))
    before = torch.cat([p.detach().flatten() for p in tiny_model.parameters()]).clone()
    assert server.receive(handmade_upload(10, [[1.0] * 6, [1.0] * 2]), None, 1.0) is None
    assert server.receive(handmade_upload(30, [[3.0] * 6, [3.0] * 2]), None, 1 / math.sqrt(3)) is None
    assert server.aggregate() is None
    after = torch.cat([p.detach().flatten() for p in tiny_model.parameters()])
    expected = (10 * 1 + 30 * 3 / math.sqrt(3)) / 40
    assert torch.allclose(after - before, torch.full_like(before, expected), atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"mode": "async", "concurrency": 2}, "mode 'async' orders its events on the simulated clock"),
    ({"mode": "async", "clock": "simulated", "concurrency": 2, "buffer_size": 3},
     "'buffer_size' (3) must not exceed 'concurrency' (2)"),
    ({"mode": "async", "clock": "simulated", "concurrency": 5}, "'concurrency' (5) must not exceed 'no_models' (4)"),
    ({"mode": "async", "clock": "simulated", "concurrency": 2, "deadline": 5.0}, "'deadline' does not act in mode"),
    ({"mode": "async", "clock": "simulated", "concurrency": 2, "download": "relay"},
     "cannot be used with download 'relay'"),
    ({"buffer_size": 3}, "'buffer_size' acts only in mode 'async'"),
])
def test_bad_async_settings_are_one_line(write_conf, tmp_path, run_main, overrides, message):
    status, _, err = run_main("-c", write_conf(**overrides), "--out", tmp_path / "run")
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_profile_csv_may_have_a_byte_order_mark_and_blank_lines(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("\ufeffclient,uplink_mbps,downlink_mbps,latency_ms,slowness,availability\r\n1,4,8,20,2,1\r\n\r\n"
                    "0,2,16,0,1,0.5\r\n\n", encoding="utf-8")
    profiles = clock.Profiles.read_csv(str(path), 2)
    assert profiles.uplink.tolist() == [2e6, 4e6] and profiles.latency.tolist() == [0, 0.02]
    assert profiles.availability.tolist() == [0.5, 1.0]


def test_a_failed_node_never_arrives_first(write_conf, tmp_path, run_main, monkeypatch):
    """An upload that came back as a failure (a silent or broken node) is timed as nothing: under over-selection it
    must not take an honest client's place. Client 0's upload always fails here."""
    from engines.inprocess import InProcess
    train = InProcess.train

    def failing_client_0(self, chosen, *args, **kwargs):
        uploads = train(self, chosen, *args, **kwargs)
        for upload in uploads:
            if upload.client_id == 0:
                upload.payload, upload.problem = b"", "the node failed (in this test)"
        return uploads
    monkeypatch.setattr(InProcess, "train", failing_client_0)
    out = tmp_path / "run"
    status, _, err = run_main("-c", write_conf(clock="simulated", over_select=1.5, global_epochs=6), "--out", out)
    assert status == 0 and "the node failed (in this test)" in err
    metrics, clients = read_csv(out / "metrics.csv"), read_csv(out / "clients.csv")
    assert all(row["client"] != "0" for row in clients)  # never timed
    for metric in metrics:  # two honest uploads arrived in every round, whether or not client 0 was sampled
        assert len([row for row in clients if row["round"] == metric["round"] and row["arrived"] == "1"]) == 2
    assert any("0" in metric["clients"].split() for metric in metrics)  # so client 0 was sampled and left out


@pytest.mark.parametrize("damage, message", [
    (lambda rows: rows[:1] + rows[2:], "round 1 of metrics.csv and its clients in clients.csv do not match"),
    (lambda rows: rows + ["2,99,1,1,1,0,0,0,0,1"], "its client or a count is out of range"),
    (lambda rows: rows + ["2,-1,1,1,1,0,0,0,0,1"], "its client or a count is out of range"),
    (lambda rows: [rows[0]] + [rows[1].replace(",8,", "," + "9" * 400 + ",", 1)] + rows[2:],
     "its client or a count is out of range"),
    (lambda rows: rows + ["9,1,1,1,1,0,0,0,0,1"], "clients.csv holds rounds that metrics.csv does not"),
])
def test_retiming_a_damaged_run_is_one_line(write_conf, tmp_path, run_main, capsys, damage, message):
    out = tmp_path / "run"
    assert run_main("-c", write_conf(clock="simulated"), "--out", out)[0] == 0
    lines = (out / "clients.csv").read_text().splitlines()
    (out / "clients.csv").write_text("\n".join([lines[0]] + damage(lines[1:])) + "\n")
    assert retime.main([str(out), "--profile", "wifi", "--out", str(tmp_path / "retimed")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "retimed").exists()


def test_retiming_refuses_async_runs_and_occupied_folders(write_conf, tmp_path, run_main, capsys):
    runs = {}
    for name, overrides in {"async": {"mode": "async", "concurrency": 2}, "a": {}, "b": {}}.items():
        runs[name] = tmp_path / name
        assert run_main("-c", write_conf(clock="simulated", **overrides), "--out", runs[name])[0] == 0
    assert retime.main([str(runs["async"]), "--profile", "wifi"]) == 2
    assert "run asynchronously" in capsys.readouterr().err
    before = (runs["b"] / "metrics.csv").read_bytes()
    assert retime.main([str(runs["a"]), "--profile", "wifi", "--out", str(runs["b"])]) == 2
    assert "already holds a run's metrics.csv" in capsys.readouterr().err
    assert (runs["b"] / "metrics.csv").read_bytes() == before


def test_a_resume_refuses_a_profile_csv_changed_since_the_run_started(write_conf, tmp_path, run_main):
    path = tmp_path / "p.csv"
    write_profile(path, [(c, 10, 10, 10, 1, 1) for c in range(4)])
    out = tmp_path / "run"
    assert run_main("-c", write_conf(clock="simulated", profile=str(path), global_epochs=2), "--out", out)[0] == 0
    write_profile(path, [(c, 10, 10, 10, 1, 0.5) for c in range(4)])
    status, _, err = run_main("--out", out, "--resume", "--set", "global_epochs=3")
    assert status == 2 and f"its profile {path} changed since the run started" in err
    write_profile(path, [(c, 10, 10, 10, 1, 1) for c in range(4)])  # as it was: the run goes on
    assert run_main("--out", out, "--resume", "--set", "global_epochs=3")[0] == 0


def test_availability_memory_keeps_the_share_online_and_lengthens_the_spells():
    """20,000 clients online 70% of the rounds, 300 rounds: with memory m = 0.8 a client's state persists, and by hand
    an online spell lasts 1 / ((1 - m)(1 - p)) = 16.7 rounds on average (3.3 without memory), the share online stays
    p, and a resumed clock (made anew, asked for a later round first) finds the same clients."""
    def run(memory, rounds=300):
        conf = {"clock": "simulated", "profile": "wifi", "no_models": 20_000, "seed": 0, "availability": 0.7,
                "availability_memory": memory, "step_seconds": 0.01}
        timer = clock.Clock(conf, [1] * 20_000)
        states = np.zeros((rounds, 20_000), dtype=bool)
        for r in range(1, rounds + 1):
            states[r - 1, timer.online(r)] = True
        return states, conf

    for memory, spell in ((0.0, 1 / 0.3), (0.8, 1 / (0.2 * 0.3))):
        states, conf = run(memory)
        assert states[50:].mean() == pytest.approx(0.7, abs=0.005)
        starts = (states[1:] & ~states[:-1]).sum()  # spells that begin after round 1
        assert states[1:].sum() / starts == pytest.approx(spell, rel=0.05)
    resumed = clock.Clock(conf, [1] * 20_000)
    assert np.array_equal(resumed.online(120), np.flatnonzero(states[119]))
    assert np.array_equal(resumed.online(7), np.flatnonzero(states[6]))  # and back again


def test_availability_memory_of_one_is_refused(write_conf, tmp_path, run_main):
    status, _, err = run_main("-c", write_conf(clock="simulated", availability=0.5, availability_memory=1.0),
                              "--out", tmp_path / "run")
    assert status == 2 and "'availability_memory' must be < 1" in err
