"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"), accounted with Opacus's RDP accountant.

    python main.py -c ./utils/conf.json --set no_models=1000 --set k=100 --set dp_clip=0.5 --set dp_noise_multiplier=1.0

With `dp_clip` set, each round's clients are sampled as the accountant assumes: every client independently with
probability q = k / no_models (Poisson sampling, as the paper does), so the count varies round to round. The server
clips each decoded update to L2 norm `dp_clip`, sums them unweighted, adds Gaussian noise of std
`dp_noise_multiplier * dp_clip` to every entry of the sum, and divides by k, the expected count (the paper's
fixed-denominator estimator), whatever `aggregation` says. The noise comes from a stream seeded by the run's seed,
so that runs repeat: a real deployment draws it from a secure generator, which no one can replay.

Under secure aggregation (`secure_aggregation: true`) the server sees only the sum, so clipping moves to the clients:
each scales its update before encoding it so that what it sends, fixed point's rounding included, is within dp_clip
(`clip_on_client`), and adds it unweighted; the server adds the noise to the sum the protocol hands it. The server
itself sees that sum before the noise, as in Flower's central DP with client-side clipping: the guarantee is for
whoever sees the models.

ε is reported at `dp_delta` for the rounds played (each counts: a rolled-back round's noised sum was released too).
"""
import math

import torch

import clock
import robust
import secure
from codec.quantizers import fixed_step
from utils.seeding import generator


class PrivacyError(ValueError):
    """A run whose privacy cannot be accounted as asked (a target ε it would pass)."""


def enabled(conf):
    return conf["dp_clip"] > 0


def delta(conf):
    """The δ at which ε is reported: dp_delta, or 1 / no_models^1.1 (below 1 / no_models, as δ must be)."""
    return conf["dp_delta"] or 1 / conf["no_models"] ** 1.1


def sample_rate(conf):
    return conf["k"] / conf["no_models"]


def epsilon(conf, rounds):
    """ε after `rounds` rounds of the sampled Gaussian mechanism (Opacus's RDP accountant); inf without noise."""
    if rounds == 0:
        return 0.0
    if conf["dp_noise_multiplier"] == 0:
        return math.inf
    from opacus.accountants import RDPAccountant  # imported when asked: a run without DP does without it
    from opacus.accountants.analysis import rdp
    orders = RDPAccountant.DEFAULT_ALPHAS
    spent = rdp.compute_rdp(q=sample_rate(conf), noise_multiplier=conf["dp_noise_multiplier"], steps=rounds,
                            orders=orders)
    return float(rdp.get_privacy_spent(orders=orders, rdp=spent, delta=delta(conf))[0])


def check(conf):
    """Refuse, before anything starts, a run whose clients' availability (a CSV profile's column) would change who is
    sampled, or whose ε after its rounds would pass dp_target_epsilon."""
    if not enabled(conf):
        return
    if conf["clock"] != "none" and not clock.is_preset(conf["profile"]) and \
            (clock.Profiles.for_run(conf).availability < 1).any():
        raise PrivacyError(f"differential privacy (dp_clip) cannot be combined with the profile {conf['profile']}: "
                           f"its clients' availability below 1 would change who is sampled, which the accountant "
                           f"does not know")
    target = conf["dp_target_epsilon"]
    if not target:
        return
    spent = epsilon(conf, conf["global_epochs"])
    if spent <= target:
        return
    low, high = 0, conf["global_epochs"]  # the most rounds within the target: epsilon grows with the rounds
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if epsilon(conf, middle) <= target else (low, middle - 1)
    raise PrivacyError(f"{conf['global_epochs']} rounds would spend epsilon {spent:.3g} at delta {delta(conf):.3g}, "
                       f"over dp_target_epsilon {target:g}: it affords {low} rounds (or raise dp_noise_multiplier)")


def sample(conf, round_index):
    """The clients of round `round_index` under Poisson sampling: each with probability k / no_models, seeded."""
    draws = torch.rand(conf["no_models"], generator=generator(conf["seed"], "sample", round_index), dtype=torch.float64)
    return (draws < sample_rate(conf)).nonzero().flatten().tolist()


def noisy_mean(uploads, numels, conf, round_index, device):
    """Per tensor, the round's DP-FedAvg update in float64 from its decoded uploads (robust.Decoded, unsent entries as
    zero): each clipped to L2 norm dp_clip over the whole model, summed unweighted, then `noised`."""
    clip = conf["dp_clip"]
    sums = [torch.zeros(n, dtype=torch.float64, device=device) for n in numels]
    for upload in uploads:
        norm = robust.norm(upload)
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for total, kept, value in zip(sums, upload.positions, upload.values):
            if kept is None:
                total.add_(value, alpha=scale)
            else:
                total.index_add_(0, kept, value * scale)
    return noised(sums, conf, round_index)


def noised(sums, conf, round_index):
    """The round's update from the sums of its clipped updates (float64, per tensor, changed in place): Gaussian noise
    of std dp_noise_multiplier * dp_clip added to every entry, divided by k. Under a shared random mask the noise
    goes only to the mask's entries: every other entry is zero in every upload, which the mask's seed (known before
    the round, independent of the data) already tells."""
    noise = generator(conf["seed"], "dp noise", round_index)
    std = conf["dp_noise_multiplier"] * conf["dp_clip"]
    for total, kept in zip(sums, secure.movable(conf, round_index, [len(total) for total in sums])):
        kept = None if kept is None else kept.to(total.device)
        entries = total if kept is None else total[kept]
        entries += std * torch.randn(len(entries), generator=noise, dtype=torch.float64).to(total.device)
        if kept is not None:
            total[kept] = entries
    return [total / conf["k"] for total in sums]


def clips_on_client(conf):
    """Under secure aggregation the server sees only the sum, so each client clips its own update, before encoding."""
    return enabled(conf) and conf["secure_aggregation"]


def worst_rounding(conf, entries):
    """The most fixed point's rounding can add to the L2 norm of `entries` sent values: half a step on each."""
    return fixed_step(conf["fixed_range"], conf["fixed_bits"]) * math.sqrt(entries) / 2


def encode_clipped(diffs, conf, round_index, encode):
    """A client's upload under DP with secure aggregation, and the diffs it encoded: `encode` (diffs -> codec.Encoded)
    of `diffs` scaled so that what the server's sum holds of it, the values on the fixed-point grid, has L2 norm at most
    dp_clip.

    Rounding to the grid can lengthen a vector, by up to `worst_rounding`. Scaling to dp_clip less that worst case
    would always hold, but the rounding's typical share is far smaller, so the client first tries tighter scales: it
    encodes, measures what it would send, and shrinks the norm by the excess until it fits (PASSES tries); then the
    worst case. Only what is sent is measured (the entries this round's upload can carry), and fixed point's own
    clipping to +-fixed_range only shrinks it."""
    movable = secure.movable(conf, round_index, [len(diff) for diff in diffs])
    entries = sum(len(diff) if kept is None else len(kept) for diff, kept in zip(diffs, movable))
    norm = robust.l2([diff if kept is None else diff[kept.to(diff.device)] for diff, kept in zip(diffs, movable)])
    clip = conf["dp_clip"]
    bound = min(norm, clip)
    for _ in range(PASSES):
        clipped = scaled(diffs, bound / norm) if norm > bound else diffs
        encoded = encode(clipped)
        excess = robust.l2(encoded.values) ** 2 - clip ** 2
        if excess <= 0:
            return encoded, clipped
        bound = math.sqrt(max(bound ** 2 - excess, 0.0)) * (1 - 2 ** -10)  # the rounding's share, taken off
    clipped = scaled(diffs, max(clip - worst_rounding(conf, entries), 0.0) / norm)
    return encode(clipped), clipped


PASSES = 4  # the tighter scales a client tries before the worst case; two almost always fit


def scaled(diffs, factor):
    """`diffs` times `factor`, a little less: the margin covers float32's rounding of the scaled entries."""
    return [diff * (factor * (1 - 2 ** -20)) for diff in diffs]


def check_rounding(conf, numels):
    """Refuse DP under secure aggregation whose dp_clip the fixed-point rounding of an upload (its first round's
    entries: a shared mask's count varies little round to round) could exceed."""
    if not clips_on_client(conf):
        return
    entries = secure.movable_entries(conf, 1, numels)
    worst = worst_rounding(conf, entries)
    if worst >= conf["dp_clip"]:
        raise PrivacyError(f"dp_clip {conf['dp_clip']:g} is within fixed point's rounding: half a step on each of "
                           f"an upload's {entries} entries can add {worst:.3g} to its norm, and a client could be "
                           f"left nothing to send; raise dp_clip or fixed_bits, or lower fixed_range")
