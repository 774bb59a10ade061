"""Robustness: what a malicious client does (simulated attacks, for experiments) and what the server bounds of it.

A client the federation admitted controls its upload: the values of its diff and the number of examples it claims.
The attacks act on the diff before the codec, so an attack goes through the same compression as an honest upload.
Without any configuration the server bounds both: a claimed count is cut to the client's registered count (server.py),
and a round after which the test loss is not finite is rolled back (federation.play_round).

An upload here is `Decoded`: what server.Server.receive decoded, values in float64 on the server's device.
"""
from typing import NamedTuple

import torch

from utils.seeding import generator

ATTACKS = ("scale", "sign_flip", "noise", "count")
MAX_COUNT = 2**32 - 1  # the most examples an upload can claim (u32)


class Decoded(NamedTuple):
    count: int  # the examples it stands for, as the server bounded them
    positions: list  # per tensor: the sent flat positions, or None when every entry was sent
    values: list  # per tensor: the sent values (float64)


# ---- attacks: what a malicious client sends ---------------------------------------------------------------------

def attacks(conf, client_id, round_index):
    """Whether `client_id` is malicious in round `round_index`: clients 0 .. attackers-1, from round attack_from."""
    return client_id < conf["attackers"] and round_index >= conf["attack_from"]


def attack(conf, diffs, num_samples, client_id, round_index):
    """(diffs, num_samples) as a malicious client sends them, from the honest ones (flat tensors; not modified)."""
    kind, scale = conf["attack"], conf["attack_scale"]
    if kind == "count":
        return diffs, MAX_COUNT
    if kind == "noise":  # drawn on the CPU from a named stream, so that a rerun, on any device, draws the same
        draw = generator(conf["seed"], "attack", round_index, client_id)
        return [diff + scale * diff.std(correction=0) * torch.randn(diff.numel(), generator=draw).to(diff.device)
                for diff in diffs], num_samples
    factor = scale if kind == "scale" else -scale
    return [diff * factor for diff in diffs], num_samples
