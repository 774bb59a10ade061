"""Robustness: the simulated attacks."""
import copy
import math

import pytest
import torch

import codec
import federation
from client import Client
from conftest import without_seconds
from engines.inprocess import InProcess
from utils import config, plot
from utils.seeding import derive_seed

MAX_COUNT = 2**32 - 1


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
    ("count", (MAX_COUNT, [[1, -2, 0, 0, 0, 3], [0.5, -1]])),
])
def test_attacks_by_hand(make_conf, tiny_model, attack, expected):
    settings = dict(attackers=1, attack=attack, attack_scale=10.0, attack_from=2)
    assert sent(make_conf, tiny_model, 0, 2, **settings) == expected
    honest = (7, [[1, -2, 0, 0, 0, 3], [0.5, -1]])
    assert sent(make_conf, tiny_model, 0, 1, **settings) == honest  # before attack_from
    assert sent(make_conf, tiny_model, 1, 2, **settings) == honest  # not one of the attackers


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


# ---- configuration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(attackers=5), "error: config key 'attackers' (5) must not exceed 'no_models' (4)"),
    (dict(attack="backdoor"), "error: config key 'attack' must be one of scale, sign_flip, noise, count"),
    (dict(attack_from=0), "error: config key 'attack_from' must be >= 1"),
])
def test_impossible_settings_are_one_error_line(write_conf, run_main, tmp_path, settings, message):
    status, _, err = run_main("-c", write_conf(**settings), "--out", tmp_path / "run")
    assert status == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_plot_labels_leave_out_the_attack_keys_without_attackers():
    assert {"attack", "attack_scale", "attack_from"} <= plot.unused_keys(config.DEFAULTS)
    assert not {"attack", "attack_scale", "attack_from"} & plot.unused_keys({**config.DEFAULTS, "attackers": 1})
