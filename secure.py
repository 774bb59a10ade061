"""Secure aggregation, simulated: the server learns only the round's sum of the uploads (Bonawitz et al. 2017; SecAgg+,
Bell et al. 2020), computed as the protocol computes it, in the integers modulo 2^secagg_bits.

    python main.py -c ./utils/conf.json --set secure_aggregation=true --set sparsifier=none --set quantize=fixed

Masks that cancel in the sum only work on vectors that sum: every client sends the same coordinates (every entry, or
a random mask shared by the round's clients, `mask: shared`), as integers on one grid (`quantize: fixed`, whose step
every client shares). A client's field elements are its example count times its fixed-point codes, and its count;
the server's sum of them wraps modulo 2^secagg_bits, which the run refuses to start without the headroom to hold
(`check_headroom`), and counts any entry that wrapped (`secagg_overflows`). Because the fixed-point step is a power of
two, the same sums computed in floating point without secure aggregation are exact too: a run learns bit for bit as
it does without it.

Bytes: the masked vector travels as field elements, secagg_bits per sent coordinate and one for the count
(`upload_bytes`), and the protocol's own messages are counted apart (`secagg_up_bytes`, `secagg_down_bytes`) from
their sizes in SecAgg+: each client agrees keys with `neighbours` others, secret-shares its mask seed and key among
them, and answers the unmasking round.
"""
import dataclasses
import math

import torch

import client
import privacy
import robust
from codec import sparsifiers
from codec.quantizers import fixed_step

# SecAgg+ messages, per client, in bytes (X25519 keys, Shamir shares over a 32-byte secret, AES-GCM for the shares
# that go through the server)
PUBLIC_KEYS = 2 * 32  # its two public keys (one to agree masks, one to encrypt shares), advertised once per round
# to one neighbour: ids, a share of its mask seed and of its key, nonce, tag
ENCRYPTED_SHARES = 4 + 4 + 2 * 32 + 12 + 16
UNMASKING_SHARE = 4 + 32  # a neighbour's id and the one share the server asks it for
CLIENT_ID = 4


class SecureAggregationError(ValueError):
    """A run whose sums could wrap around the field."""


def movable(conf, round_index, numels):
    """Per tensor, the entries an upload of this round can carry, known to all in advance: a shared random mask's
    positions (CPU int64), or None (every entry)."""
    if conf["sparsifier"] == "random" and conf["mask"] == "shared":
        return sparsifiers.random_positions(client.mask_seed(conf, None, round_index), conf["prop"], numels)
    return [None] * len(numels)


def on_shared_mask(uploads, conf, round_index, numels):
    """`uploads` (robust.Decoded) carried to the round's shared mask: an entry a client sent outside it is dropped and
    one it left out is zero, so what the server sums, and where DP puts its noise, never depends on a client keeping
    to the mask (the mask's seed travels in the payload)."""
    shared = movable(conf, round_index, numels)
    if all(kept is None for kept in shared):
        return uploads
    carried = []
    for upload in uploads:
        values = []
        for kept, sent, value, numel in zip(shared, upload.positions, upload.values, numels):
            if sent is not None and torch.equal(sent.cpu(), kept):
                values.append(value)
                continue
            full = value.new_zeros(numel)
            full[slice(None) if sent is None else sent] = value
            values.append(full[kept.to(full.device)])
        carried.append(robust.Decoded(upload.count, [kept.to(v.device) for kept, v in zip(shared, values)], values))
    return carried


def movable_counts(conf, round_index, numels):
    """Per tensor, how many entries every upload of round `round_index` carries."""
    return [numel if kept is None else len(kept) for kept, numel in zip(movable(conf, round_index, numels), numels)]


def movable_entries(conf, round_index, numels):
    """How many entries every upload of round `round_index` carries, in all."""
    return sum(movable_counts(conf, round_index, numels))


def masked_upload_size(conf, round_index, numels):
    """Bytes of one client's masked vector in round `round_index`: the coordinates every upload carries."""
    return masked_size(movable_entries(conf, round_index, numels), conf)


def neighbours(clients):
    """Each client's neighbours in SecAgg+'s sparse graph: O(log n), here min(n - 1, 2 * ceil(log2 n))."""
    return min(clients - 1, 2 * math.ceil(math.log2(clients))) if clients > 1 else 0


def at_least_two(uploads):
    """A round's uploads as secure aggregation takes them: none, each with why, when fewer than two came back (SecAgg+
    needs two, and the sum of one upload is that upload)."""
    if sum(upload.problem is None for upload in uploads) >= 2:
        return uploads
    return [dataclasses.replace(upload, problem=upload.problem or "secure aggregation needs two uploads in a round, "
                                "this one has one") for upload in uploads]


def protocol_bytes(sampled, arrived):
    """(uploaded, downloaded) bytes of the protocol's own messages in a round where `sampled` clients started it and
    `arrived` sent their masked vectors: key advertisement and share distribution for every sampled client, the
    unmasking round for those that arrived; none when fewer than two were sampled (it does not start)."""
    if sampled < 2:
        return 0, 0
    d = neighbours(sampled)
    up = sampled * (PUBLIC_KEYS + d * ENCRYPTED_SHARES) + arrived * d * UNMASKING_SHARE
    down = sampled * d * (PUBLIC_KEYS + ENCRYPTED_SHARES) + arrived * d * CLIENT_ID
    return up, down


def masked_size(entries, conf):
    """Bytes of a masked vector: `entries` field elements and the count's, secagg_bits each."""
    return math.ceil((entries + 1) * conf["secagg_bits"] / 8)


def weight(conf, count):
    """What a client's codes are multiplied by in the field: its example count, or 1 under differential privacy,
    whose sum is unweighted."""
    return 1 if privacy.enabled(conf) else count


def check_headroom(conf, registered):
    """Refuse a run whose field cannot hold the largest honest sum: the round's clients (k with the largest shares;
    under DP's Poisson sampling, possibly every client, each weighing 1) each adding its weight times a code of up to
    2^(fixed_bits-1) - 1, signed."""
    weights = [weight(conf, count) for count in registered]
    heaviest = sum(sorted(weights, reverse=True)[:len(weights) if privacy.enabled(conf) else conf["k"]])
    largest_sum = heaviest * (2 ** (conf["fixed_bits"] - 1) - 1)
    needed = largest_sum.bit_length() + 1  # and the sign
    if conf["secagg_bits"] < needed:
        uploads = f"all {heaviest} clients, 1 each (Poisson sampling may take them all)" if privacy.enabled(conf) \
            else f"{conf['k']} uploads weighing up to {heaviest} examples in all"
        raise SecureAggregationError(
            f"secagg_bits {conf['secagg_bits']} cannot hold a round's sum: {uploads}, at fixed_bits "
            f"{conf['fixed_bits']}, need {needed} bits (with the sign)")
    if largest_sum >= 2 ** 53:  # past it, float64 sums (without secure aggregation) round, and the two paths differ
        raise SecureAggregationError(
            f"a round's sum could reach {largest_sum} grid steps, past 2^53, where sums in float64 stop being exact: "
            f"lower fixed_bits or k")


def field_sums(uploads, numels, conf, device):
    """The round's sums as the protocol delivers them: per tensor, sum of w_i * value_i and sum of w_i over the
    clients that sent each entry, both float64, the total weight, and how many entries wrapped around the field (w_i:
    `weight`).
    `uploads` are robust.Decoded of fixed-point values on one grid; the integers are exact in int64."""
    step, modulus = fixed_step(conf["fixed_range"], conf["fixed_bits"]), 2 ** conf["secagg_bits"]
    sums, weights, overflows = [], [], 0
    for index, numel in enumerate(numels):
        total = torch.zeros(numel, dtype=torch.int64, device=device)
        counts = torch.zeros(numel, dtype=torch.int64, device=device)
        for upload in uploads:
            count = weight(conf, upload.count)
            codes = torch.round(upload.values[index] / step).to(torch.int64) * count
            kept = upload.positions[index]
            if kept is None:
                total += codes
                counts += count
            else:
                total.index_add_(0, kept, codes)
                counts.index_add_(0, kept, counts.new_full((len(kept),), count))
        wrapped = wrap(total, modulus)
        overflows += int((wrapped != total).sum())
        sums.append(wrapped.to(torch.float64) * step)
        weights.append(wrap(counts, modulus).to(torch.float64))
    total_weight = wrap(torch.tensor(sum(weight(conf, u.count) for u in uploads)), modulus).item()
    return sums, weights, total_weight, overflows


def wrap(integers, modulus):
    """Integers as the field holds them, read back as signed: into [-modulus/2, modulus/2)."""
    return (integers + modulus // 2) % modulus - modulus // 2


def delivered(codes, total_weight, conf, round_index, numels):
    """The round's sums, as field_sums returns them (on the CPU), from what a protocol run for real delivered
    (engines/secagg.py): per tensor, the integer sums of weight times code over the round's movable entries, and the
    sum of the weights. Nothing wrapped: the run was refused unless the field holds every honest sum, and a sum that
    did wrap could not be told from one that did not."""
    step = fixed_step(conf["fixed_range"], conf["fixed_bits"])
    sums, weights = [], []
    for summed, kept, numel in zip(codes, movable(conf, round_index, numels), numels):
        entries = slice(None) if kept is None else kept
        total, counts = torch.zeros(numel, dtype=torch.float64), torch.zeros(numel, dtype=torch.float64)
        total[entries] = summed.to(torch.float64) * step
        counts[entries] = float(total_weight)
        sums.append(total)
        weights.append(counts)
    return sums, weights, total_weight, 0
