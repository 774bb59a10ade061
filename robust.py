"""Robustness: what a malicious client does (simulated attacks, for experiments) and what the server does about it
(the `defense` rules of its aggregation step).

A client the federation admitted controls its upload: the values of its diff and the number of examples it claims.
The attacks act on the diff before the codec, so an attack goes through the same compression as an honest upload.
Without any configuration the server bounds both: a claimed count is cut to the client's registered count (server.py),
and a round after which the test loss blew up (not finite, or over 10 times a uniform guess's) is rolled back
(federation.play_round). The defenses below bound
how far one upload can pull the step; each works on what the server decodes, so on sparse and quantized uploads alike:

    norm_bound        each upload scaled down to at most clip_norm (or clip_multiple times the round's median norm) in
                      L2 norm over what the server reconstructs (unsent entries are zero); then the aggregation rule
    median            per entry, the median over the clients that sent that entry (unweighted); nobody sent it: 0
    trimmed_mean      per entry, the mean over the clients that sent it, without the floor(trim_fraction * senders)
                      largest and smallest values (unweighted); nobody sent it: 0
    geometric_median  the point nearest to all uploads in summed L2 distance (RFA, Pillutla et al. 2019: smoothed
                      Weiszfeld), unsent entries as zero, each upload weighted by its (bounded) example count

The geometric median rather than Krum: Krum needs k >= 2f + 3 clients per round to tolerate f attackers (impossible at
k=2, the default) and keeps one client's upload, throwing the others' work away; the geometric median averages, and
moves at most a bounded distance however large one upload of fewer than half of the weight is.

An upload here is `Decoded`: what server.Server.receive decoded, values in float64 on the server's device.
"""
import math
from typing import NamedTuple

import torch

from utils.seeding import generator

ATTACKS = ("scale", "sign_flip", "noise", "fill", "count")
DEFENSES = ("none", "norm_bound", "median", "trimmed_mean", "geometric_median")
MAX_COUNT = 2**32 - 1  # the most examples an upload can claim (u32)
WEISZFELD_ITERATIONS = 5  # RFA reports that a few iterations suffice; each costs one pass over the uploads
WEISZFELD_SMOOTHING = 1e-6  # distances below this count as this, so that an upload at the current point weighs finitely


class Decoded(NamedTuple):
    count: int  # the examples it stands for, as the server bounded them
    positions: list  # per tensor: the sent flat positions, or None when every entry was sent
    values: list  # per tensor: the sent values (float64)


# ---- attacks: what a malicious client sends ---------------------------------------------------------------------

def attacks(conf, client_id, round_index):
    """Whether `client_id` is malicious in round `round_index`: clients 0 .. attackers-1, from round attack_from to
    attack_until (0: to the end)."""
    last = conf["attack_until"] or math.inf
    return client_id < conf["attackers"] and conf["attack_from"] <= round_index <= last


def attack(conf, diffs, num_samples, client_id, round_index):
    """(diffs, num_samples) as a malicious client sends them, from the honest ones (flat tensors; not modified)."""
    kind, scale = conf["attack"], conf["attack_scale"]
    if kind == "count":
        return diffs, MAX_COUNT
    if kind == "fill":  # finite, so every check of the values passes: what one upload of 1e30 does
        return [torch.full_like(diff, scale) for diff in diffs], num_samples
    if kind == "noise":  # drawn on the CPU from a named stream, so that a rerun, on any device, draws the same
        draw = generator(conf["seed"], "attack", round_index, client_id)
        return [diff + scale * diff.std(correction=0) * torch.randn(diff.numel(), generator=draw).to(diff.device)
                for diff in diffs], num_samples
    factor = scale if kind == "scale" else -scale
    return [diff * factor for diff in diffs], num_samples


# ---- defenses: the server's step from a round's decoded uploads -------------------------------------------------

def norm(upload):
    """The L2 norm of what the server reconstructs of `upload` (each entry is sent at most once; unsent ones are 0)."""
    return l2(upload.values)


def l2(tensors):
    """The L2 norm of `tensors` together, summed in float64."""
    return math.sqrt(sum(float(tensor.double().square().sum()) for tensor in tensors))


def norm_bound(uploads, clip_norm, clip_multiple):
    """`uploads`, each scaled down to at most the bound in norm: `clip_norm`, or when that is 0 `clip_multiple` times
    the round's median norm. The lower median of an even count: of two uploads the smaller norm sets the bound, so
    one boosted upload of two cannot raise its own."""
    norms = [norm(upload) for upload in uploads]
    bound = clip_norm or clip_multiple * sorted(norms)[(len(norms) - 1) // 2]
    return [upload if size <= bound else upload._replace(values=[value * (bound / size) for value in upload.values])
            for upload, size in zip(uploads, norms)]


def per_entry(uploads, numels, statistic):
    """Per tensor, `statistic(ordered, senders)` of every entry over the clients that sent it: `ordered` holds a row
    per entry, its sent values sorted with NaN (not sent) after them, `senders` how many sent it."""
    device = uploads[0].values[0].device
    out = []
    for t, numel in enumerate(numels):
        sent = torch.full((len(uploads), numel), math.nan, dtype=torch.float64, device=device)
        for row, upload in zip(sent, uploads):
            kept = upload.positions[t]
            row[slice(None) if kept is None else kept] = upload.values[t]
        senders = (~sent.isnan()).sum(0)
        # NaN sorts last; sorting the contiguous rows of the transpose is about twice as fast as sorting columns
        ordered = sent.t().contiguous().sort(dim=1).values
        out.append(torch.where(senders > 0, statistic(ordered, senders), 0.0))
    return out


def median(ordered, senders):
    """The mean of the two middle values (the middle one for an odd count): the lower median alone would pull every
    entry sent by two clients towards the smaller value."""
    lower = ordered.gather(1, ((senders - 1).clamp(min=0) // 2).unsqueeze(1))
    upper = ordered.gather(1, (senders // 2).unsqueeze(1))
    return ((lower + upper) / 2).squeeze(1)


def trimmed(fraction):
    """The statistic: the mean without the floor(fraction * senders) smallest and largest values (fraction < 0.5
    leaves at least one)."""
    def mean(ordered, senders):
        cut = (fraction * senders).floor().long()
        rank = torch.arange(ordered.shape[1], device=ordered.device)
        kept = (rank >= cut.unsqueeze(1)) & (rank < (senders - cut).unsqueeze(1))
        # summed over a client per row, as docs/robustness.md's runs were: torch sums another layout in another order
        total = torch.where(kept, ordered, 0.0).t().contiguous().sum(0)
        return total / (senders - 2 * cut).clamp(min=1)
    return mean


def combination(uploads, coefficients, numels):
    """Sum over uploads of coefficient * what the server reconstructs of it, per tensor."""
    device = uploads[0].values[0].device
    out = [torch.zeros(numel, dtype=torch.float64, device=device) for numel in numels]
    for upload, coefficient in zip(uploads, coefficients):
        for total, kept, value in zip(out, upload.positions, upload.values):
            if kept is None:
                total += coefficient * value
            else:
                total.index_add_(0, kept, coefficient * value)
    return out


def distance(point, upload):
    """The L2 distance between `point` (dense, per tensor) and what the server reconstructs of `upload`."""
    squares = 0.0
    for entries, kept, value in zip(point, upload.positions, upload.values):
        gap = entries - value if kept is None else entries.index_add(0, kept, -value)
        squares += float(gap.square().sum())
    return math.sqrt(squares)


def geometric_median(uploads, numels):
    """Smoothed Weiszfeld from the weighted mean: each step reweights every upload by its count over its distance to
    the current point."""
    counts = [upload.count for upload in uploads]
    point = combination(uploads, [count / sum(counts) for count in counts], numels)
    for _ in range(WEISZFELD_ITERATIONS):
        betas = [count / max(WEISZFELD_SMOOTHING, distance(point, upload)) for count, upload in zip(counts, uploads)]
        point = combination(uploads, [beta / sum(betas) for beta in betas], numels)
    return point
