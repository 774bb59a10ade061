"""Client-level differential privacy (privacy.py): DP-FedAvg's clipped, noised, fixed-denominator step, Poisson
sampling, ε from Opacus's accountant, and what a DP run refuses."""
import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

import client
import main
import privacy
import robust
from conftest import TINY, read_csv, without_seconds
from utils import config
from utils.seeding import derive_seed

DP = {**TINY, "no_models": 8, "k": 3, "global_epochs": 3, "server_validation": 0, "dp_clip": 0.5,
      "dp_noise_multiplier": 0.8}


def write(tmp_path, **overrides):
    path = tmp_path / "conf.json"
    path.write_text(json.dumps({**DP, "data_dir": str(tmp_path), **overrides}))
    return str(path)


def opacus_epsilon(noise_multiplier, sample_rate, rounds, delta):
    """Opacus's accountant used as its documentation shows: one step per round, ε at δ."""
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta)


def test_epsilon_per_round_is_opacus_accountants_to_three_digits(tmp_path):
    assert main.main(["-c", write(tmp_path), "--out", str(tmp_path / "run")]) == 0
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    delta = 1 / 8 ** 1.1  # the default: 1 / no_models^1.1
    for row in rows:
        expected = opacus_epsilon(0.8, 3 / 8, int(row["round"]), delta)
        assert float(row["epsilon"]) == pytest.approx(expected, rel=5e-4)
    assert float(rows[0]["epsilon"]) < float(rows[1]["epsilon"]) < float(rows[2]["epsilon"])


def test_epsilon_at_the_papers_scale():
    """N = 1000, k = 100, noise 1.0, 100 rounds, delta 1e-5: the setting of the Privacy results."""
    conf = config.validate({"no_models": 1000, "k": 100, "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1e-5,
                            "global_epochs": 100})
    assert privacy.epsilon(conf, 100) == pytest.approx(opacus_epsilon(1.0, 0.1, 100, 1e-5), rel=5e-4)
    assert privacy.epsilon(conf, 0) == 0 and privacy.epsilon({**conf, "dp_noise_multiplier": 0.0}, 5) == math.inf


def test_poisson_sampling_includes_each_client_with_probability_k_over_n():
    conf = config.validate({"no_models": 50, "k": 10, "dp_clip": 1.0, "seed": 4})
    rounds = [privacy.sample(conf, r) for r in range(1, 2001)]
    assert rounds[0] == privacy.sample(conf, 1) and rounds[0] != rounds[1]  # seeded per round
    counts = [len(chosen) for chosen in rounds]
    assert len(set(counts)) > 5  # the count varies, as Poisson sampling's does
    assert abs(sum(counts) / len(counts) - 10) < 0.3  # mean k; its standard error here is 0.063
    per_client = torch.bincount(torch.tensor(sum(rounds, [])), minlength=50) / 2000
    assert per_client.min() > 0.16 and per_client.max() < 0.24  # each 0.2, standard error 0.009


def test_noisy_mean_clips_each_update_to_the_bound_and_divides_by_k():
    conf = config.validate({"no_models": 10, "k": 4, "dp_clip": 1.0})
    dense = robust.Decoded(7, [None, None], [torch.tensor([3.0, 4.0], dtype=torch.float64),
                                             torch.tensor([0.0], dtype=torch.float64)])  # norm 5: scaled by 1/5
    sparse = robust.Decoded(2, [torch.tensor([1]), None], [torch.tensor([0.3], dtype=torch.float64),
                                                           torch.tensor([-0.4], dtype=torch.float64)])  # norm 0.5
    update = privacy.noisy_mean([dense, sparse], [2, 1], conf, 1, "cpu")  # no noise: dp_noise_multiplier 0
    # unweighted (the example counts 7 and 2 do not count), unsent entries as zero, over k = 4 whatever arrived
    assert torch.allclose(update[0], torch.tensor([0.6, 0.8 + 0.3], dtype=torch.float64) / 4, atol=1e-12)
    assert torch.allclose(update[1], torch.tensor([-0.4], dtype=torch.float64) / 4, atol=1e-12)


def test_noise_has_the_std_the_multiplier_and_clip_give_and_repeats_per_round():
    conf = config.validate({"no_models": 10, "k": 4, "dp_clip": 0.5, "dp_noise_multiplier": 2.0})
    noise = privacy.noisy_mean([], [200_000], conf, 3, "cpu")[0] * 4  # the sum's noise, before the division
    assert abs(float(noise.std()) - 1.0) < 0.01 and abs(float(noise.mean())) < 0.01  # std 2.0 * 0.5
    assert torch.equal(noise, privacy.noisy_mean([], [200_000], conf, 3, "cpu")[0] * 4)
    assert not torch.equal(noise, privacy.noisy_mean([], [200_000], conf, 4, "cpu")[0] * 4)


def test_a_dp_run_resumes_exactly(tmp_path):
    conf = write(tmp_path)
    assert main.main(["-c", conf, "--out", str(tmp_path / "straight")]) == 0
    assert main.main(["-c", conf, "--set", "global_epochs=2", "--out", str(tmp_path / "resumed")]) == 0
    assert main.main(["--out", str(tmp_path / "resumed"), "--resume", "--set", "global_epochs=3"]) == 0
    assert without_seconds(read_csv(tmp_path / "resumed" / "metrics.csv")) == \
        without_seconds(read_csv(tmp_path / "straight" / "metrics.csv"))


def test_a_target_epsilon_it_would_pass_is_refused_with_the_rounds_it_affords(tmp_path, capsys):
    delta = 1 / 8 ** 1.1
    target = (opacus_epsilon(0.8, 3 / 8, 6, delta) + opacus_epsilon(0.8, 3 / 8, 7, delta)) / 2  # 6 rounds fit
    conf = write(tmp_path, global_epochs=10, dp_target_epsilon=target)
    assert main.main(["-c", conf, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "it affords 6 rounds" in error and "over dp_target_epsilon" in error
    assert not (tmp_path / "run").exists()
    assert main.main(["-c", conf, "--set", "global_epochs=6", "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("overrides, message", [
    ({"mode": "async", "clock": "simulated", "concurrency": 4}, "mode 'async'"),
    ({"clock": "simulated", "availability": 0.5}, "availability below 1"),
    ({"clock": "simulated", "over_select": 1.5}, "over_select"),
    ({"clock": "simulated", "deadline": 3.0}, "a deadline"),
    ({"defense": "median"}, "defense 'median'"),
    ({"download": "relay"}, "download 'relay'"),
    ({"attackers": 1}, "simulated attackers"),
    ({"dp_clip": 0.0}, "config key 'dp_noise_multiplier' acts only with differential privacy: set dp_clip"),
    ({"dp_noise_multiplier": 0.0, "dp_target_epsilon": 3.0}, "dp_target_epsilon needs noise"),
])
def test_what_dp_cannot_account_for_is_refused_in_one_line(tmp_path, capsys, overrides, message):
    assert main.main(["-c", write(tmp_path, **overrides), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error


def test_a_csv_profile_with_clients_offline_is_refused(tmp_path, capsys):
    profile = tmp_path / "profile.csv"
    profile.write_text("client,uplink_mbps,downlink_mbps,latency_ms,slowness,availability\n" +
                       "".join(f"{c},10,50,40,1,{0.5 if c == 3 else 1}\n" for c in range(8)))
    conf = write(tmp_path, clock="simulated", profile=str(profile))
    assert main.main(["-c", conf, "--out", str(tmp_path / "run")]) == 2
    assert "its clients' availability below 1 would change who is sampled" in capsys.readouterr().err


def test_a_shared_mask_is_every_clients_and_new_each_round():
    conf = config.validate({"mask": "shared", "seed": 5})
    assert client.mask_seed(conf, 0, 3) == client.mask_seed(conf, 7, 3) != client.mask_seed(conf, 0, 4)
    per_client = config.validate({"mask": "round", "seed": 5})
    assert client.mask_seed(per_client, 0, 3) != client.mask_seed(per_client, 7, 3)


def test_under_a_shared_mask_the_noise_goes_only_to_the_masks_entries():
    conf = config.validate({"no_models": 10, "k": 4, "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "prop": 0.1,
                            "mask": "shared", "seed": 2})
    update = privacy.noisy_mean([], [5000, 300], conf, 6, "cpu")
    draw = torch.Generator().manual_seed(derive_seed(2, "shared mask", 6))  # the mask every client of round 6 draws
    masks = [torch.rand(n, generator=draw) < 0.1 for n in (5000, 300)]
    for entries, mask in zip(update, masks):
        assert torch.equal(entries != 0, mask)
    dense = privacy.noisy_mean([], [5000, 300], {**conf, "mask": "round"}, 6, "cpu")
    assert all(bool((entries != 0).all()) for entries in dense)  # without it, every entry gets noise


def test_a_dp_run_with_a_shared_mask_uploads_only_the_masks_share(tmp_path):
    assert main.main(["-c", write(tmp_path, mask="shared", prop=0.1), "--out", str(tmp_path / "run")]) == 0
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert all(abs(float(row["upload_fraction"]) - 0.1) < 0.01 for row in rows if row["clients"])


def test_accuracy_is_plotted_against_the_privacy_spent(tmp_path, capsys, monkeypatch):
    from utils import plot
    assert main.main(["-c", write(tmp_path), "--out", str(tmp_path / "dp")]) == 0
    plain = write(tmp_path, dp_clip=0.0, dp_noise_multiplier=0.0)
    assert main.main(["-c", plain, "--out", str(tmp_path / "plain")]) == 0
    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)  # keep the figure to read its lines back
    assert plot.main([str(tmp_path / "dp"), "-o", str(tmp_path / "e.png"), "--x", "epsilon"]) == 0
    xs = figures[0].axes[0].lines[0].get_xdata()
    assert list(xs) == [float(row["epsilon"]) for row in read_csv(tmp_path / "dp" / "metrics.csv")]
    assert figures[0].axes[0].get_xlabel().startswith("Epsilon")
    capsys.readouterr()
    assert plot.main([str(tmp_path / "plain"), "-o", str(tmp_path / "p.png"), "--x", "epsilon"]) == 2
    assert "was made without differential privacy (no epsilon)" in capsys.readouterr().err
    table = plot.table([str(tmp_path / "dp"), str(tmp_path / "plain")]).splitlines()
    assert table[0].endswith(" epsilon |")
    spent = float(read_csv(tmp_path / "dp" / "metrics.csv")[-1]["epsilon"])
    assert table[2].endswith(f" {spent:.3g} |") and table[3].endswith(" - |")


def test_a_target_epsilon_holds_from_python_too(tmp_path):
    import federation
    from engines.inprocess import InProcess
    conf = config.validate({**DP, "data_dir": str(tmp_path), "global_epochs": 50, "dp_target_epsilon": 1.0})
    with pytest.raises(privacy.PrivacyError, match="over dp_target_epsilon 1"):
        federation.run(conf, str(tmp_path / "run"), False, InProcess)
    assert not (tmp_path / "run").exists()
