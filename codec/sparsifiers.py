"""Sparsifiers: which entries of a diff travel (or, for PowerSGD, which factors), one class per method, registered by
its config name in SPARSIFIERS (the layout of each one's part of a payload is in codec/__init__.py)."""
import collections
import math
import struct
import threading

import numpy as np
import torch

from codec.positions import decode_positions, encode_positions, true_positions
from codec.wire import PayloadError, expect
from utils import seeding


RANDOM_HEADER = struct.Struct("<Qd")
HYBRID_RANDOM = struct.Struct("<QI")
RANK = struct.Struct("<H")


class Sparsifier:
    """Turns a sender's diffs into coefficients, the groups of values the quantizer writes, and the decoded groups back
    into what the receiver reconstructs. These defaults are a selection of entries (`select`): the plan is per tensor
    the kept flat positions (None: every entry), a tensor's kept entries are its one group, and they are what the
    receiver reconstructs, at those positions. Each sparsifier's decode(reader, numels, value_bits, method) reads its
    part of a payload into the plan, refusing parameters that are not `method`'s (`expect`) and a plan that the bytes
    left (`value_bits` or more per coefficient) cannot hold."""
    keys = ()  # the config keys a sparsifier reads
    one_group = False  # whether ternary may share one magnitude over all groups

    def __init__(self, conf):
        pass

    def memory_numels(self, shapes):
        return None  # a selection keeps nothing from one encode to the next

    def encode(self, diffs, mask_seed, shapes, memory):
        """(the plan, the coefficients' groups, the sparsifier's part of the payload, the memory for the next encode)"""
        positions, sparsifier_part = self.select(diffs, mask_seed)
        return positions, entries(diffs, positions), sparsifier_part, None

    @staticmethod
    def counts(plan, numels):
        """How many coefficients each group of a decoded plan holds."""
        return [numel if where is None else len(where) for numel, where in zip(numels, plan)]

    @staticmethod
    def expand(plan, values):
        """(per tensor the flat positions the receiver reconstructs, None for every entry; their values) from the
        groups' values."""
        return plan, values


def entries(tensors, positions):
    """Per tensor, its entries at `positions` (all of it where None)."""
    return [t if where is None else t.index_select(0, where.to(t.device)) for t, where in zip(tensors, positions)]


class Dense(Sparsifier):
    name, wire_id = "none", 0
    help = "every entry (a dense upload; `prop` unused)"

    def select(self, diffs, mask_seed):
        return [None] * len(diffs), b""

    @staticmethod
    def decode(reader, numels, value_bits, method):
        return [None] * len(numels)


class RandomMask(Sparsifier):
    name, wire_id, keys = "random", 1, ("prop", "mask")
    help = "a Bernoulli(`prop`) mask per tensor, the chapter's; only its seed travels, the server regenerates it"

    def __init__(self, conf):
        self.prop = conf["prop"]

    def select(self, diffs, mask_seed):
        positions = random_positions(mask_seed, self.prop, [diff.numel() for diff in diffs])
        return positions, RANDOM_HEADER.pack(mask_seed, self.prop)

    @staticmethod
    def decode(reader, numels, value_bits, method):
        mask_seed, prop = reader.unpack(RANDOM_HEADER)
        if not 0 <= prop <= 1:  # NaN fails too
            raise PayloadError(f"mask density {prop} is not in [0, 1]")
        expect(method, "prop", prop, "mask density")
        return random_positions(mask_seed, prop, numels)


class TopK(Sparsifier):
    name, wire_id, keys = "topk", 2, ("prop", "topk_scope")
    help = "the `ceil(prop * n)` largest |entries|, of each tensor or of the whole model (`topk_scope`)"

    def __init__(self, conf):
        self.prop, self.scope = conf["prop"], conf["topk_scope"]
        self.one_group = self.scope == "model"  # one selection over the model: ternary shares one magnitude

    def select(self, diffs, mask_seed):
        positions = topk_positions(diffs, self.prop, self.scope)
        return positions, encode_positions(positions, [diff.numel() for diff in diffs])

    @staticmethod
    def decode(reader, numels, value_bits, method):
        expected = topk_count(method["prop"], numels, method["topk_scope"]) if "prop" in method else None
        return decode_positions(reader, numels, value_bits, expected)


class Hybrid(Sparsifier):
    name, wire_id, keys = "hybrid", 3, ("prop", "topk_share", "topk_scope", "mask")
    help = ("the `ceil(prop * n)` entries of the whole model split: the largest |entries| for a `topk_share` of them "
            "(per tensor or of the whole model, `topk_scope`), the rest drawn at random from a seed among the others; "
            "only the top-k positions and the seed travel")
    one_group = False  # ternary's one magnitude suits one top-k selection, not top entries mixed with random ones

    def __init__(self, conf):
        self.prop, self.share, self.scope = conf["prop"], conf["topk_share"], conf["topk_scope"]

    def select(self, diffs, mask_seed):
        numels = [diff.numel() for diff in diffs]
        top = [where.cpu() for where in topk_positions(diffs, self.share * self.prop, self.scope)]
        count = self.random_count(self.prop, numels, sum(len(where) for where in top))
        positions = with_random_others(top, numels, mask_seed, count)
        return positions, encode_positions(top, numels) + HYBRID_RANDOM.pack(mask_seed, count)

    @staticmethod
    def random_count(prop, numels, taken):
        """How many random positions join `taken` top ones: the budget is top-k's at this prop, and per-tensor
        ceilings of the top-k part can leave the random part nothing."""
        return max(0, kept_count(prop, sum(numels)) - taken)

    @staticmethod
    def decode(reader, numels, value_bits, method):
        expected = (topk_count(method["topk_share"] * method["prop"], numels, method["topk_scope"]) if "prop" in method
                    else None)
        top = decode_positions(reader, numels, value_bits, expected)
        mask_seed, count = reader.unpack(HYBRID_RANDOM)
        taken = sum(len(where) for where in top)
        if "prop" in method and count != Hybrid.random_count(method["prop"], numels, taken):
            raise PayloadError(f"{count} random positions beside {taken} top ones, where this run's prop gives "
                               f"{Hybrid.random_count(method['prop'], numels, taken)}")
        if count > sum(numels) - taken:
            raise PayloadError(f"{count} random positions among the {sum(numels) - taken} not in the top-k")
        reader.require_bits((taken + count) * value_bits, f"the values of {taken + count} positions")
        return with_random_others(top, numels, mask_seed, count)


class PowerSGD(Sparsifier):
    name, wire_id, keys = "powersgd", 4, ("rank",)
    help = ("PowerSGD (Vogels et al. 2019): each weight matrix's diff M (a conv kernel with a row per output channel) "
            "as rank-`rank` factors P = M Q orthonormalized and Q' = M^T P, one power step from this sender's previous "
            "Q'; the receiver reconstructs P Q'^T. Biases, BatchNorm statistics and matrices too small to gain travel "
            "whole; `prop` unused")

    def __init__(self, conf):
        self.rank = conf["rank"]

    def factored(self, shape):
        """(rows, cols) of the matrix a tensor of `shape` travels as, its first dimension against the others; None
        when it travels whole: a vector, or a matrix whose factors would hold no fewer values than it."""
        rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (0, 0)
        return (rows, cols) if self.rank * (rows + cols) < rows * cols else None

    def memory_numels(self, shapes):
        """Per tensor, the entries of its warm start, the previous Q' (none for a tensor that travels whole)."""
        return [0 if factored is None else factored[1] * self.rank for factored in map(self.factored, shapes)]

    def encode(self, diffs, mask_seed, shapes, memory):
        plan, coefficients, starts = [], [], []
        for index, (diff, shape) in enumerate(zip(diffs, shapes)):
            factored = self.factored(shape)
            if factored is None:
                plan.append(None)
                coefficients.append(diff)
                starts.append(diff.new_zeros(0))
                continue
            rows, cols = factored
            if memory is None:  # a sender's first encode: a start of its own, the same on every machine
                draw = seeding.generator(mask_seed, "powersgd start", index)
                start = torch.randn(cols, self.rank, generator=draw).to(diff.device)
            else:
                # a copy, which the allocator aligns: MKL's products round differently with their operands'
                # alignment, and a warm start decoded from a node's state is a view into one buffer
                start = memory[index].view(cols, self.rank).clone()
            matrix = diff.reshape(rows, cols)
            # Householder QR rather than Gram-Schmidt: P stays orthonormal to float precision even when its columns
            # are nearly parallel (as warm starts make them when one direction dominates the update), so that the
            # reconstruction P Q'^T = P P^T M projects M and what error feedback keeps is never larger than M; and a
            # zero column of M Q gives an orthonormal column, not a division by zero
            p = torch.linalg.qr(matrix @ start).Q
            q = matrix.T @ p
            plan.append((rows, cols, self.rank))
            coefficients += [p.flatten(), q.flatten()]
            # the next start is Q' with unit columns (in f64, where their norms cannot overflow): the power step does
            # not depend on their scale, and a diverged round's Q' (6e37, say) would overflow the next M Q. A column
            # of Q' that is zero (no update along it) or not finite keeps its previous start: it would start every
            # later step at zero or NaN
            q64 = q.double()
            norms = q64.norm(dim=0)
            starts.append(torch.where(torch.isfinite(norms) & (norms > 0), q64 / norms, start).float().flatten())
        rows_part = np.array([0 if factored is None else factored[0] for factored in plan], dtype="<u4").tobytes()
        return plan, coefficients, RANK.pack(self.rank) + rows_part, starts

    @staticmethod
    def decode(reader, numels, value_bits, method):
        (rank,) = reader.unpack(RANK)
        if rank < 1:
            raise PayloadError("PowerSGD rank 0")
        # rank-r factors cost r multiply-adds per entry to reconstruct: unbounded, 2.3 MB of sign-coded rank-1536
        # factors held the server 1.8 s of CPU on ResNet-18 (minutes on VGG-16)
        expect(method, "rank", rank, "PowerSGD rank")
        plan = []
        for numel, rows in zip(numels, reader.array("<u4", len(numels)).tolist()):
            if not rows:
                plan.append(None)
                continue
            if numel % rows:
                raise PayloadError(f"{rows} rows do not divide a tensor of {numel} entries")
            cols = numel // rows
            if rank > min(rows, cols):
                raise PayloadError(f"rank {rank} is above a {rows}x{cols} matrix's")
            plan.append((rows, cols, rank))
        count = sum(PowerSGD.counts(plan, numels))
        reader.require_bits(count * value_bits, f"{count} coefficients")
        return plan

    @staticmethod
    def counts(plan, numels):
        """Per tensor, its entries (travelling whole) or its two factors' (P's, then Q's)."""
        return [count for numel, factored in zip(numels, plan)
                for count in ([numel] if factored is None else [factored[0] * factored[2], factored[1] * factored[2]])]

    @staticmethod
    def expand(plan, values):
        groups = iter(values)
        out = []
        for factored in plan:
            if factored is None:
                out.append(next(groups))
                continue
            rows, cols, rank = factored
            p, q = next(groups), next(groups)
            out.append(low_rank_product(p.view(rows, rank), q.view(cols, rank)).to(p.device))
        return [None] * len(plan), out


def low_rank_product(p, q):
    """P Q'^T, flattened, in f32, bit for bit the same on every machine: on the CPU in f64, where each product of two
    f32 is exact, as the sum of the rank-one terms in a fixed order (a matrix product sums in its library's order)."""
    product = torch.zeros(len(p), len(q), dtype=torch.float64)
    # each factor's columns made contiguous: addr_ of strided columns runs many times slower
    for p_column, q_column in zip(p.cpu().double().T.contiguous(), q.cpu().double().T.contiguous()):
        product.addr_(p_column, q_column)  # += the next term: exact products, one rounding per entry
    return product.float().flatten()


def random_positions(seed, prop, numels):
    """Per tensor, the sorted flat positions a Bernoulli(prop) mask keeps; the same on every machine for a seed.
    Callers share what is returned (MASKS) and must not change it."""
    key = (seed, prop, tuple(numels))
    positions = MASKS.get(key)
    if positions is None:
        packed = PACKED_MASKS.get(key)
        if packed is None:
            generator = torch.Generator().manual_seed(seed)
            kept = [(torch.rand(numel, generator=generator) < prop).numpy() for numel in numels]
            PACKED_MASKS.put(key, [np.packbits(k) for k in kept], sum(-(-numel // 8) for numel in numels))
        else:
            kept = [np.unpackbits(bits, count=numel).view(bool) for bits, numel in zip(packed, numels)]
        positions = [true_positions(torch.from_numpy(k)) for k in kept]
        MASKS.put(key, positions, sum(8 * len(where) for where in positions))
    return positions


class NewestFirst:
    """The newest values put, up to `budget` bytes (the least recently used go first); thread-safe, as the nodes of a
    Flower deployment may share a process."""

    def __init__(self, budget):
        self.budget, self.used = budget, 0
        self.values = collections.OrderedDict()  # key -> (value, its bytes), least recently used first
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.values:
                return None
            self.values.move_to_end(key)
            return self.values[key][0]

    def put(self, key, value, size):
        with self.lock:
            if size > self.budget or key in self.values:
                return
            self.values[key] = value, size
            self.used += size
            while self.used > self.budget:
                self.used -= self.values.popitem(last=False)[1][1]


# Drawing a mask costs a client 1.6 ms per upload of the CNN, a third of the simulator's own time per client at 1000
# clients; the server draws the same mask again to decode the upload. In one process the second draw is a lookup: 256
# MB holds the masks of 100 uploads of the CNN at prop 0.6 (2 MB each), so a round's decodes find all its encodes'
MASKS = NewestFirst(256 * 2**20)
# ... and a fixed mask (the default) is the same every round a client is sampled: kept packed, a bit an entry (53 KB
# for the CNN: 64 MB holds 1200 clients'), it is unpacked and its positions found in 0.25 ms instead of drawn in 1.6
PACKED_MASKS = NewestFirst(64 * 2**20)


def with_random_others(top, numels, seed, count):
    """Per tensor, the sorted positions `top` (on the CPU) plus `count` more drawn uniformly without replacement among
    the model's other entries: those whose seeded f64 key is largest, the same on every machine for a seed. f64 keys:
    among millions of f32 keys, ties would be common.

    What is made is the keys, a mark per entry and the positions returned: a top-k over every entry's key took +499 MB
    and seconds on a ResNet-18-sized model."""
    offsets = np.cumsum([0] + list(numels[:-1])).tolist()
    taken = torch.cat([where + offset for where, offset in zip(top, offsets)] or [torch.zeros(0, dtype=torch.long)])
    marked = torch.zeros(sum(numels), dtype=torch.bool)
    marked[taken] = True
    if count:
        mark_largest_keys(marked, seed, count)
    return [true_positions(part) for part in marked.split(list(numels))]


def mark_largest_keys(marked, seed, count):
    """Mark the `count` unmarked entries whose seeded f64 keys are largest. The unmarked keys are uniform, so the
    count-th largest lies near 1 - count / unmarked: the keys above a window of 8 standard deviations around that
    point are marked outright, and the largest of the few inside it make up the count (the window widens in the rare
    case that they cannot)."""
    keys = torch.rand(len(marked), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    keys.masked_fill_(marked, -1.0)  # below every unmarked key
    unmarked = len(marked) - int(marked.sum())
    middle = 1 - count / unmarked
    width = 8 * math.sqrt(count * (unmarked - count) / unmarked) / unmarked + 64 / unmarked
    while True:
        above = int((keys >= middle + width).sum())
        near = true_positions((keys >= middle - width) & (keys < middle + width))
        if above <= count <= above + len(near):
            break
        width *= 4
    marked |= keys >= middle + width
    marked[near[keys[near].topk(count - above, sorted=False).indices]] = True


def topk_positions(diffs, prop, scope="tensor"):
    """Sorted flat positions of the largest |entries|: ceil(prop * numel) per tensor, or of the whole model."""
    if scope == "tensor":
        return [largest(d.abs(), kept_count(prop, d.numel())) for d in diffs]
    flat = torch.cat([d.abs() for d in diffs])
    chosen = largest(flat, kept_count(prop, flat.numel()))
    bounds = torch.tensor([0] + [d.numel() for d in diffs], device=chosen.device).cumsum(0)
    cuts = torch.searchsorted(chosen, bounds).tolist()
    return [chosen[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(diffs))]


def largest(values, count):
    """The sorted positions of the `count` largest of `values` (flat), the set torch.topk chooses.

    torch.topk selects among all entries (3 ms for STC's 16,866 of the CNN's 421,642 on the CPU, most of an STC
    encode). On the CPU, when exactly `count` entries are at least the count-th largest value, that set is the only
    answer, and it is found among the entries above a threshold read off a sample of 8192, about twice as many as
    asked. Where it is not (a tie at the boundary, NaN, a threshold that leaves too few), torch.topk decides, as
    before: the same set in every case."""
    if values.device.type != "cpu" or count == 0 or count * 4 > len(values) or len(values) < 2**16:
        return values.topk(count, sorted=False).indices.sort().values
    array = values.numpy()
    # a fixed pseudo-random sample: a strided one follows a weight matrix's rows and columns, and misjudged the
    # threshold of one upload in eight
    sample = array[np.random.default_rng(len(array)).integers(0, len(array), 8192)]
    rank = len(sample) - math.ceil(2 * len(sample) * count / len(array)) - 16
    threshold = np.partition(sample, rank)[rank] if rank > 0 else -math.inf
    candidates = np.flatnonzero(array >= threshold)  # NaN never is: then too few, or a different set, caught below
    if len(candidates) >= count and not np.isnan(threshold):
        kept = array[candidates]
        boundary = np.partition(kept, len(kept) - count)[len(kept) - count]  # the count-th largest
        taken = kept >= boundary
        if int(taken.sum()) == count and not np.isnan(array).any():
            return torch.from_numpy(candidates[taken])
    return values.topk(count, sorted=False).indices.sort().values


def topk_count(prop, numels, scope):
    """How many positions topk_positions keeps of tensors of `numels` entries."""
    if scope == "tensor":
        return sum(kept_count(prop, numel) for numel in numels)
    return kept_count(prop, sum(numels))


def kept_count(prop, numel):
    """ceil(prop * numel), ignoring float noise: prop 0.07 of 100 entries keeps 7, although 0.07 * 100 > 7."""
    return math.ceil(round(prop * numel, 9))


SPARSIFIERS = {cls.name: cls for cls in (RandomMask, TopK, Dense, Hybrid, PowerSGD)}
