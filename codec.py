"""Compression methods and the upload's wire format: `encode` (the client's side) is the only code that writes an
upload, `decode` (the server's side) the only code that reads one, and an upload's size is the length of its bytes.

A method is a sparsifier times a quantizer, each one class below registered by its config name in SPARSIFIERS or
QUANTIZERS; config choices, plot labels and the README's table of methods derive from these registries. A sparsifier
turns the diffs into coefficients, groups of values, and the receiver's decoded groups back into the diff it
reconstructs: most select entries (a group per tensor: its kept entries), PowerSGD factors matrices (two groups per
factored tensor: its factors). The quantizer writes the groups' values. Sparse Ternary Compression (Sattler et al.
2019) is TopK over the whole model times Ternary, with error feedback. To add a method, write one class and register
it.

Layout, little-endian; tensors are the model's floating-point state-dict entries, flattened, in order:
    header      version u8 | sparsifier id u8 | quantizer id u8 | num_samples u32 | num_tensors u32
    sparsifier  none:   nothing (every entry travels)
                random: mask_seed u64 | prop f64; the receiver regenerates the Bernoulli(prop) mask
                topk:   coding u8 | count u32 | the kept positions over the flattened model, coded as a bitmap,
                        a list of u8/u16/u32 indices, or Golomb-Rice gaps, whichever is smallest (POSITION_CODINGS)
                hybrid: the top-k part's positions as topk's | seed u64 | count u32; the receiver regenerates the
                        random part, `count` positions drawn uniformly from the seed among those not in the top-k
                powersgd: rank r u16 | per tensor: rows u32, 0 for a tensor that travels whole. A tensor of n entries
                        with rows > 0 is a rows x (n / rows) matrix M that travels as its factors P (rows x r) and Q'
                        (n / rows x r), row-major; the receiver reconstructs P Q'^T (low_rank_product)
    values      the groups' values, group after group, as the quantizer writes them (a group: a tensor's kept values,
                or one factor of a factored tensor, P then Q', so that each factor has its own scales):
                none: f32 each | f16: f16 each | int8: a f32 scale per group that keeps values, then i8 each |
                sign: a f32 magnitude per group that keeps values, then one sign bit each |
                ternary: groups u8 (0: a magnitude per group, 1: one for all), the f32 magnitudes, one sign bit each |
                qsgd: levels s u16 | bucket size u32 | a f32 norm per bucket (each group's values cut into buckets) |
                      every value's level l in 0..s as the Elias-gamma code of l + 1, in two streams | a sign bit per
                      nonzero level
Golomb-Rice gaps: the parameter b u8, then the b-bit remainders of all gaps, then their unary quotients (q zeros and a
one each): as many bits as interleaving them, and both streams code and decode without a loop per entry. Elias-gamma
codes are split the same way: the unary lengths of all codes (n - 1 zeros and a one for an n-bit integer), then their
binary tails (the n - 1 bits after the leading one), each stream padded to a byte.

Downloads use the same payloads (downloads.py decides what they carry): a compressed download's round message is an
upload-format payload of the server's step (num_samples 0), and a sync (`encode_sync`) wraps payloads in a kind byte:
    replay      0 | rounds u32 | per round: payloads u32 | per payload: length u32 and its bytes
    changed     1 | one payload: topk positions and f32 values, the entries changed since the client's last sync
    dense       2 | one payload: every entry, f32
"""
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from utils import seeding

VERSION = 2
HEADER = struct.Struct("<BBBII")
RANDOM_HEADER = struct.Struct("<Qd")
HYBRID_RANDOM = struct.Struct("<QI")
QSGD_HEADER = struct.Struct("<HI")
POSITIONS_HEADER = struct.Struct("<BI")
RANK = struct.Struct("<H")
BITMAP, INDEX_U8, INDEX_U16, INDEX_U32, GOLOMB = range(5)
INDEX_DTYPES = {INDEX_U8: np.dtype("<u1"), INDEX_U16: np.dtype("<u2"), INDEX_U32: np.dtype("<u4")}
SCALE_DTYPE = np.dtype("<f4")
GOLDEN_SECTION = (math.sqrt(5) - 1) / 2  # phi - 1, from the optimal Golomb parameter of geometric gaps
UNARY_WINDOW = 1 << 16  # bytes of unary codes searched at once: 0.5 MB of bits, at most 4 MB of their positions
FIELD_CHUNK = 1 << 20  # bit fields cut out at once: a few arrays of 8 MB


class PayloadError(ValueError):
    """Bytes that are not a well-formed upload for this model."""


@dataclass
class Encoded:
    payload: bytes  # what travels
    positions: list  # per tensor: the flat positions it reconstructs (sorted int64), or None for every entry
    values: list  # per tensor: the values the receiver will decode there (quantization included)
    memory: list | None = None  # what the sender's sparsifier carries to its next encode (None: it keeps nothing)


def encode(conf, diffs, num_samples, mask_seed=0, rounding_seed=0, shapes=None, memory=None):
    """The upload of `diffs` (flat float tensors) under the method `conf` names; `mask_seed` seeds a random mask (the
    same every round under `mask: fixed`), `rounding_seed` a quantizer's random rounding (new every round). `shapes`
    are the tensors' own (default: the diffs', flat), `memory` what this sender's previous encode left (its
    Encoded.memory)."""
    sparsifier = SPARSIFIERS[conf["sparsifier"]](conf)
    shapes = shapes or [diff.shape for diff in diffs]
    plan, coefficients, sparsifier_part, memory = sparsifier.encode(diffs, mask_seed, shapes, memory)
    return assemble(sparsifier, plan, coefficients, sparsifier_part, QUANTIZERS[conf["quantize"]](conf), num_samples,
                    rounding_seed, memory)


DENSE_F32 = {"sparsifier": "none", "quantize": "none"}  # writes a model exactly: a dense sync, a client's kept state
CHANGED_ENTRIES = {"sparsifier": "topk", "quantize": "none"}  # encode_entries' method, of any count


def encode_entries(tensors, positions):
    """Exactly the entries of `tensors` (flat) at `positions` (per tensor, sorted), as f32 values at positions coded
    as top-k's are: what a client's sync carries of the entries that changed since it last synchronized."""
    sparsifier_part = encode_positions(positions, [t.numel() for t in tensors])
    return assemble(TopK, positions, entries(tensors, positions), sparsifier_part, Float32({}), 0).payload


def assemble(sparsifier, plan, coefficients, sparsifier_part, quantizer, num_samples, rounding_seed=0, memory=None):
    value_part, values = quantizer.encode(coefficients, sparsifier.one_group, rounding_seed)
    header = HEADER.pack(VERSION, sparsifier.wire_id, quantizer.wire_id, num_samples, len(plan))
    return Encoded(header + sparsifier_part + value_part, *sparsifier.expand(plan, values), memory)


def decode(payload, numels, method=None):
    """(num_samples, positions, values) from an upload's bytes, for a model whose tensors have `numels` entries.

    `method` is what the receiver expects (a run's conf, or DENSE_F32, CHANGED_ENTRIES): a payload of another
    sparsifier or quantizer, or whose parameters on the wire (a random mask's prop, top-k's and the hybrid's counts,
    PowerSGD's rank, QSGD's levels and bucket size) are not the ones `method` gives, is refused from its headers, before
    its body is read. A key `method` leaves out is not checked (a changed-entries sync has any count); None accepts
    any well-formed payload (for tools and tests, never for a receiver): every method is attack surface, and an
    expected one costs no more to decode than an honest upload of the run."""
    reader = Reader(payload)
    version, sparsifier_id, quantizer_id, num_samples, num_tensors = reader.unpack(HEADER)
    if version != VERSION or sparsifier_id not in SPARSIFIER_IDS or quantizer_id not in QUANTIZER_IDS:
        raise PayloadError(f"unknown payload version {version}, sparsifier {sparsifier_id} or quantizer {quantizer_id}")
    sparsifier, quantizer = SPARSIFIER_IDS[sparsifier_id], QUANTIZER_IDS[quantizer_id]
    if method is not None and (sparsifier.name, quantizer.name) != (method["sparsifier"], method["quantize"]):
        raise PayloadError(f"sparsifier {sparsifier.name} and quantize {quantizer.name}, where this run's are "
                           f"{method['sparsifier']} and {method['quantize']}")
    if num_tensors != len(numels):
        raise PayloadError(f"payload holds {num_tensors} tensors, the model has {len(numels)}")
    plan = sparsifier.decode(reader, numels, quantizer.value_bits, method or {})
    values = quantizer.decode(reader, sparsifier.counts(plan, numels), method or {})
    if not reader.done():
        raise PayloadError(f"payload has {reader.remaining()} bytes after its last value")
    return (num_samples, *sparsifier.expand(plan, values))


def expect(method, key, value, what):
    """Refuse `value`, read from a payload, unless it is `method`'s `key` (when `method` gives that key)."""
    if key in method and value != method[key]:
        raise PayloadError(f"{what} {value}, where this run's {key} is {method[key]}")


def with_num_samples(payload, num_samples):
    """`payload`, a well-formed upload, claiming `num_samples` examples instead (only its header changes)."""
    version, sparsifier_id, quantizer_id, _, num_tensors = HEADER.unpack_from(payload)
    return HEADER.pack(version, sparsifier_id, quantizer_id, num_samples, num_tensors) + payload[HEADER.size:]


def dense_size(numels):
    """Bytes of a dense f32 payload of a model with `numels` entries per tensor (a dense upload, or the download)."""
    return HEADER.size + 4 * sum(numels)


# ---- sparsifiers: which entries travel ----------------------------------------------------------------------------

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
    return [t if where is None else t[where.to(t.device)] for t, where in zip(tensors, positions)]


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


def memory_numels(conf, shapes):
    """Per tensor, the entries of the memory a sender keeps between encodes under `conf`'s sparsifier (for tensors of
    `shapes`); None when it keeps none."""
    return SPARSIFIERS[conf["sparsifier"]](conf).memory_numels(shapes)


def random_positions(seed, prop, numels):
    """Per tensor, the sorted flat positions a Bernoulli(prop) mask keeps; the same on every machine for a seed."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(numel, generator=generator) < prop).nonzero().squeeze(1) for numel in numels]


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
    return [part.nonzero().squeeze(1) for part in marked.split(list(numels))]


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
        near = ((keys >= middle - width) & (keys < middle + width)).nonzero().squeeze(1)
        if above <= count <= above + len(near):
            break
        width *= 4
    marked |= keys >= middle + width
    marked[near[keys[near].topk(count - above, sorted=False).indices]] = True


def topk_positions(diffs, prop, scope="tensor"):
    """Sorted flat positions of the largest |entries|: ceil(prop * numel) per tensor, or of the whole model."""
    if scope == "tensor":
        return [d.abs().topk(kept_count(prop, d.numel()), sorted=False).indices.sort().values for d in diffs]
    flat = torch.cat([d.abs() for d in diffs])
    chosen = flat.topk(kept_count(prop, flat.numel()), sorted=False).indices.sort().values
    bounds = torch.tensor([0] + [d.numel() for d in diffs], device=chosen.device).cumsum(0)
    cuts = torch.searchsorted(chosen, bounds).tolist()
    return [chosen[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(diffs))]


def topk_count(prop, numels, scope):
    """How many positions topk_positions keeps of tensors of `numels` entries."""
    if scope == "tensor":
        return sum(kept_count(prop, numel) for numel in numels)
    return kept_count(prop, sum(numels))


def kept_count(prop, numel):
    """ceil(prop * numel), ignoring float noise: prop 0.07 of 100 entries keeps 7, although 0.07 * 100 > 7."""
    return math.ceil(round(prop * numel, 9))


# ---- positions: bitmap, index list or Golomb-Rice gaps, whichever is smallest ------------------------------------

def encode_positions(positions, numels):
    """Per-tensor sorted positions as one coded list over the flattened model."""
    offsets = np.cumsum([0] + numels[:-1])
    flat = np.concatenate([where.cpu().numpy() + offset for where, offset in zip(positions, offsets)])
    total = sum(numels)
    candidates = [(BITMAP, math.ceil(total / 8)), (index_coding(total), len(flat) * index_width(total)),
                  (GOLOMB, golomb_size(flat, total))]
    coding = min(candidates, key=lambda candidate: candidate[1])[0]
    if coding == BITMAP:
        bitmap = np.zeros(total, dtype=bool)
        bitmap[flat] = True
        coded = np.packbits(bitmap).tobytes()
    elif coding == GOLOMB:
        coded = golomb_encode(flat, total)
    else:
        coded = flat.astype(INDEX_DTYPES[coding]).tobytes()
    return POSITIONS_HEADER.pack(coding, len(flat)) + coded


def decode_positions(reader, numels, value_bits, expected=None):
    """Per-tensor positions, refusing a count other than `expected` (None: any), or one that the model or the rest of
    the payload (the positions, then `value_bits` or more per kept value) cannot hold, before anything the size of that
    count is made."""
    coding, count = reader.unpack(POSITIONS_HEADER)
    if expected is not None and count != expected:
        raise PayloadError(f"{count} positions, where this run's prop keeps {expected}")
    total = sum(numels)
    if count > total:
        raise PayloadError(f"{count} positions in a model of {total} entries")
    reader.require_bits(count * value_bits, f"the values of {count} positions")
    if coding == BITMAP:
        bits = np.unpackbits(reader.array(np.uint8, math.ceil(total / 8)))
        if bits[total:].any():
            raise PayloadError("bitmap marks entries beyond the model")
        flat = np.flatnonzero(bits)
        if len(flat) != count:
            raise PayloadError(f"bitmap marks {len(flat)} entries, header says {count}")
    elif coding == GOLOMB:
        flat = golomb_decode(reader, count, total)
    elif coding in INDEX_DTYPES:
        flat = reader.array(INDEX_DTYPES[coding], count).astype(np.int64)
        if count and (flat[-1] >= total or np.any(np.diff(flat) <= 0)):
            raise PayloadError("index list out of range or not strictly increasing")
    else:
        raise PayloadError(f"unknown positions coding {coding}")
    flat = torch.from_numpy(flat.astype(np.int64, copy=False))
    bounds = torch.tensor([0] + list(numels)).cumsum(0)
    cuts = torch.searchsorted(flat, bounds).tolist()
    return [flat[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(numels))]


def index_coding(total):
    return INDEX_U8 if total <= 2**8 else INDEX_U16 if total <= 2**16 else INDEX_U32


def index_width(total):
    return INDEX_DTYPES[index_coding(total)].itemsize


def rice_parameter(count, total):
    """The Golomb-Rice parameter for `count` positions among `total`: gaps are about geometric with p = count/total,
    and b = 1 + floor(log2(log(phi - 1) / log(1 - p))) is optimal for them (Gallager and van Voorhis 1975)."""
    p = count / total
    if p >= 0.5:
        return 0
    return max(0, 1 + math.floor(math.log2(math.log(GOLDEN_SECTION) / math.log1p(-p))))


def gaps_of(flat):
    """Gaps between sorted positions: the first position, then the entries skipped between neighbours."""
    return np.diff(flat, prepend=-1) - 1


def golomb_size(flat, total):
    if not len(flat):
        return 1
    b = rice_parameter(len(flat), total)
    quotient_bits = int((gaps_of(flat) >> b).sum()) + len(flat)
    return 1 + math.ceil(len(flat) * b / 8) + math.ceil(quotient_bits / 8)


def golomb_encode(flat, total):
    b = rice_parameter(len(flat), total)
    gaps = gaps_of(flat)
    remainder_bits = ((gaps[:, None] >> np.arange(b - 1, -1, -1)) & 1).astype(np.uint8).ravel()
    ends = np.cumsum((gaps >> b) + 1) - 1  # where each quotient's terminating one falls
    quotient_bits = np.zeros(ends[-1] + 1 if len(ends) else 0, dtype=np.uint8)
    quotient_bits[ends] = 1
    return bytes([b]) + np.packbits(remainder_bits).tobytes() + np.packbits(quotient_bits).tobytes()


def read_unary(reader, count, largest, longest_bits, what):
    """`count` unary-coded integers (that many zeros, then a one), byte-padded, each at most `largest` and together
    taking at most `longest_bits`: uint8 where `largest` fits, else int64. The bytes are searched for the codes' ones
    UNARY_WINDOW bytes at a time, so that what is made beside the integers stays a few MB whatever the bytes hold (one
    window over every bit they could take made 8 bytes per bit: 1.5 GB for a 24 MB payload of ones)."""
    reader.require_bits(count, what)  # a one bit each, at least
    integers = np.empty(count, dtype=np.uint8 if largest < 256 else np.int64)
    searched = min(math.ceil(longest_bits / 8), reader.remaining())
    found, last_end, start = 0, -1, 0
    while found < count and start < searched:
        window = np.unpackbits(reader.peek(start, min(UNARY_WINDOW, searched - start)))
        ends = np.flatnonzero(window)[:count - found] + 8 * start
        if len(ends):
            lengths = np.diff(ends, prepend=last_end) - 1
            if lengths.max() > largest:
                raise PayloadError(f"{what} hold one above {largest}")
            integers[found:found + len(ends)] = lengths
            found, last_end = found + len(ends), int(ends[-1])
        start += UNARY_WINDOW
    if found < count:
        raise PayloadError(f"{what} end early")
    used = last_end // 8 + 1 if count else 0
    if count and reader.peek(used - 1, 1)[0] & ((1 << (7 - last_end % 8)) - 1):
        raise PayloadError(f"nonzero padding after the {what}")
    reader.skip(used)
    return integers


def golomb_decode(reader, count, total):
    (b,) = reader.unpack(struct.Struct("<B"))
    if b > total.bit_length():  # never chosen for this model; larger would let a shifted quotient overflow
        raise PayloadError(f"Golomb parameter {b} is too large for a model of {total} entries")
    # b remainder bits and at least a quotient's one bit each
    reader.require_bits(count * (b + 1), f"{count} Golomb-coded positions")
    remainder_bytes = reader.array(np.uint8, math.ceil(count * b / 8))
    check_padding(remainder_bytes, count * b, "Golomb remainders")
    remainders = read_bits(remainder_bytes, count, b)
    # the quotients sum to at most (total - count) >> b, which bounds how far their terminating ones can lie
    largest = (total - count) >> b
    quotients = read_unary(reader, count, largest, largest + count, "Golomb quotients").astype(np.int64, copy=False)
    # positions = cumsum(gap + 1) - 1 with gap = (quotient << b) + remainder, in place: a few int64 per position
    flat = np.left_shift(quotients, b, out=quotients)
    flat += remainders
    flat += 1
    np.cumsum(flat, out=flat)
    flat -= 1
    if count and flat[-1] >= total:
        raise PayloadError("Golomb positions run beyond the model")
    return flat


def read_bits(data, count, width):
    """`count` unsigned `width`-bit integers packed most significant bit first, as int64. Each is cut from the 8
    bytes that begin at the byte holding its first bit (so width <= 57, and Rice parameters are at most the model
    size's bit length), FIELD_CHUNK at a time: 8 bytes of memory per integer, where unpacking would take one or more
    per bit."""
    out = np.zeros(count, dtype=np.int64)
    if width:
        padded = padded_bytes(data)
        for start in range(0, count, FIELD_CHUNK):
            stop = min(count, start + FIELD_CHUNK)
            out[start:stop] = read_fields(padded, np.arange(start * width, stop * width, width, dtype=np.uint64),
                                          np.uint64(width))
    return out


def padded_bytes(data):
    """`data` and 8 zero bytes, which the 8 bytes read_fields cuts the last integers from run into."""
    return np.concatenate([data, np.zeros(8, dtype=np.uint8)])


def read_fields(padded, first_bits, widths):
    """Unsigned integers packed most significant bit first in `padded` (padded_bytes), the i-th `widths[i]` bits (at
    most 57, or 0) from bit `first_bits[i]` (uint64, overwritten), as int64; `widths` may be one width for all."""
    words = sliding_window_view(padded, 8)[first_bits >> np.uint64(3)].view(">u8").ravel().astype(np.uint64)
    first_bits &= np.uint64(7)  # now each integer's offset in its first byte
    words <<= first_bits
    words >>= np.uint64(1)  # 64 - width in two shifts: a shift by 64 (a width of 0) is undefined
    words >>= np.uint64(63) - widths
    return words.view(np.int64)


def check_padding(data, used_bits, what):
    """The bits of `data`'s last byte after its first `used_bits` bits must be zero: one payload, one encoding."""
    spare = 8 * len(data) - used_bits
    if spare and data[-1] & ((1 << spare) - 1):
        raise PayloadError(f"nonzero padding after the {what}")


# ---- quantizers: how each kept value is written ------------------------------------------------------------------

class Quantizer:
    keys = ()  # the config keys a quantizer reads

    def __init__(self, conf):
        pass


class Float32(Quantizer):
    name, wire_id = "none", 0
    help = "f32 values, exact (4 bytes each)"
    dtype, wire_dtype = torch.float32, "<f4"
    value_bits = 32  # the least each kept value takes, which bounds how many a payload's length can claim

    def encode(self, kept, one_group, rounding_seed):
        rounded = [values.to(self.dtype) for values in kept]
        return flat_bytes(rounded, self.wire_dtype), [values.float() for values in rounded]

    @classmethod
    def decode(cls, reader, counts, method):
        return split(torch.from_numpy(reader.array(cls.wire_dtype, sum(counts)).astype(np.float32)), counts)


class Float16(Float32):
    name, wire_id = "f16", 1
    help = "half-precision values (2 bytes each; beyond +-65504 they become Inf and the upload is rejected)"
    dtype, wire_dtype = torch.float16, "<f2"
    value_bits = 16


class Int8(Quantizer):
    name, wire_id = "int8", 2
    help = "per tensor, scale = max|value| / 127 and each value rounded to the nearest multiple (1 byte each)"
    value_bits = 8

    def encode(self, kept, one_group, rounding_seed):
        scales = [values.abs().max().float() / 127 if len(values) else None for values in kept]
        codes = [(values.float() / scale).round().clamp(-127, 127).to(torch.int8) if scale else
                 torch.zeros(len(values), dtype=torch.int8, device=values.device)
                 for values, scale in zip(kept, scales)]
        scales = [float(scale) for scale in scales if scale is not None]
        payload = np.array(scales, dtype=SCALE_DTYPE).tobytes() + flat_bytes(codes, "<i1")
        return payload, Int8.dequantize(codes, scales)

    @staticmethod
    def dequantize(codes, scales):
        """codes * their tensor's scale, in float32: the client's reconstruction and the server's are the same."""
        scale_of = iter(scales)
        return [c.float() * torch.tensor(next(scale_of), dtype=torch.float32, device=c.device) if len(c) else
                c.float() for c in codes]

    @staticmethod
    def decode(reader, counts, method):
        scales = read_scales(reader, sum(1 for count in counts if count))
        codes = torch.from_numpy(reader.array("<i1", sum(counts)).copy())
        if (codes == -128).any():
            raise PayloadError("int8 code -128 is outside the symmetric range")
        return Int8.dequantize(split(codes, counts), scales.tolist())


class Sign(Quantizer):
    name, wire_id = "sign", 3
    help = "one sign bit per value times the tensor's mean |value| (scaled sign, as in error-feedback signSGD)"
    shares_magnitude = False
    value_bits = 1

    def encode(self, kept, one_group, rounding_seed):
        one_group = one_group and self.shares_magnitude and any(len(values) for values in kept)
        groups = [torch.cat(kept)] if one_group else [values for values in kept if len(values)]
        magnitudes = [float(group.abs().float().mean()) for group in groups]
        negative = [values < 0 for values in kept]
        head = bytes([one_group]) if self.shares_magnitude else b""
        payload = head + np.array(magnitudes, dtype=SCALE_DTYPE).tobytes() + pack_bits(negative)
        return payload, signed_magnitudes(negative, magnitudes, one_group)

    @classmethod
    def decode(cls, reader, counts, method):
        one_group = False
        if cls.shares_magnitude:
            (one_group,) = reader.unpack(struct.Struct("<B"))
            if one_group > 1:
                raise PayloadError(f"ternary groups flag {one_group} is not 0 or 1")
        magnitudes = read_scales(reader, 1 if one_group else sum(1 for count in counts if count))
        negative = split(unpack_bits(reader, sum(counts)), counts)
        return signed_magnitudes(negative, magnitudes.tolist(), one_group)


class Ternary(Sign):
    name, wire_id = "ternary", 4
    help = ("STC's ternary values: one sign bit per kept value times one magnitude, the mean |kept value| of the "
            "whole selection under `topk_scope: model`, else of each tensor")
    shares_magnitude = True


class QSGD(Quantizer):
    name, wire_id, keys = "qsgd", 5, ("levels", "bucket_size")
    help = ("QSGD (Alistarh et al. 2017): per bucket of `bucket_size` values a f32 norm, and each value's "
            "|value| / norm * `levels` rounded up or down at random (unbiased), Elias-gamma coded, with a sign bit")
    value_bits = 1  # a level of 0: one bit of Elias-gamma code and no sign bit

    def __init__(self, conf):
        self.levels, self.bucket_size = conf["levels"], conf["bucket_size"]

    def encode(self, kept, one_group, rounding_seed):
        counts = [len(values) for values in kept]
        values = np.concatenate([v.detach().cpu().numpy().astype(np.float64) for v in kept] or [np.zeros(0)])
        starts = bucket_starts(counts, self.bucket_size)
        norms = (np.sqrt(np.add.reduceat(values ** 2, starts)) if len(starts) else np.zeros(0)).astype(SCALE_DTYPE)
        # in f64, from the f32 norm that travels: E[level] = scaled, so the reconstruction is unbiased
        per_norm = np.divide(self.levels, norms.astype(np.float64), out=np.zeros(len(norms)), where=norms > 0)
        scaled = np.abs(values, out=values)
        scaled *= np.repeat(per_norm, np.diff(starts, append=len(values)))
        floor = np.floor(scaled)
        scaled -= floor  # now the fractional part: the probability of rounding up
        generator = torch.Generator().manual_seed(rounding_seed)
        levels = floor.astype(np.int64)
        levels += torch.rand(len(values), generator=generator, dtype=torch.float64).numpy() < scaled
        np.minimum(levels, self.levels, out=levels)  # f32 norms can round below |value|
        negative = np.concatenate([v.detach().cpu().numpy() < 0 for v in kept] or [np.zeros(0, dtype=bool)])
        negative &= levels > 0
        payload = (QSGD_HEADER.pack(self.levels, self.bucket_size) + norms.tobytes()
                   + gamma_encode(levels + 1) + np.packbits(negative[levels > 0]).tobytes())
        dequantized = qsgd_values(norms, starts, levels, negative, self.levels)
        return payload, [v.to(original.device) for v, original in zip(split(dequantized, counts), kept)]

    @staticmethod
    def decode(reader, counts, method):
        levels, bucket_size = reader.unpack(QSGD_HEADER)
        if levels < 1 or bucket_size < 1:
            raise PayloadError(f"QSGD levels {levels} or bucket size {bucket_size} below 1")
        expect(method, "levels", levels, "QSGD levels")
        expect(method, "bucket_size", bucket_size, "QSGD bucket size")
        # a f32 norm per bucket and a bit of Elias-gamma code per level, at least: checked before the buckets' starts
        # are made, 8 bytes per bucket (buckets of 1 would otherwise make 16 bytes per claimed value first)
        buckets = sum(-(-count // bucket_size) for count in counts)
        reader.require_bits(32 * buckets + sum(counts), f"{buckets} QSGD norms and {sum(counts)} levels")
        starts = bucket_starts(counts, bucket_size)
        norms = read_scales(reader, len(starts))
        level_of = gamma_decode(reader, sum(counts), levels + 1)
        level_of -= 1
        negative = np.zeros(len(level_of), dtype=bool)
        negative[level_of > 0] = unpack_bits(reader, int(np.count_nonzero(level_of))).numpy()
        return split(qsgd_values(norms, starts, level_of, negative, levels), counts)


def bucket_starts(counts, bucket_size):
    """Where each bucket begins among the values of all tensors, concatenated: a tensor's values are cut into buckets of
    `bucket_size` (its last one shorter), so that no bucket mixes tensors of different scales."""
    offsets = np.cumsum([0] + counts[:-1])
    return np.concatenate([offset + np.arange(0, count, bucket_size) for offset, count in zip(offsets, counts)]
                          or [np.zeros(0, dtype=np.int64)]).astype(np.int64)


def qsgd_values(norms, starts, levels, negative, s):
    """norm * level / s with the value's sign, in f32, computed the same way by the client and the server."""
    values = levels.astype(np.float32)
    values /= np.float32(s)
    values *= np.repeat(np.asarray(norms, dtype=np.float32), np.diff(starts, append=len(levels)))  # each one's norm
    np.negative(values, out=values, where=negative)
    return torch.from_numpy(values)


def gamma_encode(integers):
    """Elias-gamma codes of `integers` (>= 1) in two streams (see the layout): an n-bit integer is n - 1 zeros and a
    one in the first, its n - 1 bits after the leading one in the second."""
    widths = np.zeros(len(integers), dtype=np.int64)  # bit length - 1: a pass per bit of the largest
    for bit in range(1, int(integers.max()).bit_length() if len(integers) else 0):
        widths += integers >> bit > 0
    ends = np.cumsum(widths + 1) - 1
    lengths = np.zeros(ends[-1] + 1 if len(ends) else 0, dtype=np.uint8)
    lengths[ends] = 1
    long = np.flatnonzero(widths)  # integers above 1, the few that have a tail when levels are small
    tail_starts = (np.cumsum(widths) - widths)[long]  # where each tail begins in its stream
    integers, widths = integers[long], widths[long]
    tails = np.zeros(int(widths.sum()), dtype=np.uint8)
    for bit in range(int(widths.max()) if len(widths) else 0):  # the tails' bits, most significant first
        has = widths > bit
        tails[tail_starts[has] + bit] = (integers[has] >> (widths[has] - 1 - bit)) & 1
    return np.packbits(lengths).tobytes() + np.packbits(tails).tobytes()


def gamma_decode(reader, count, largest):
    """`count` Elias-gamma coded integers (int32: `largest` is at most 2^17), each refused above `largest`; the
    lengths of codes of integers up to `largest` are below its bit length."""
    most_bits = largest.bit_length()
    widths = read_unary(reader, count, most_bits - 1, count * most_bits, "Elias-gamma lengths")
    tail_bits = int(widths.sum(dtype=np.int64))
    tails = reader.array(np.uint8, math.ceil(tail_bits / 8))
    check_padding(tails, tail_bits, "Elias-gamma tails")
    padded, tails_read = padded_bytes(tails), 0
    integers = np.ones(count, dtype=np.int32)
    for start in range(0, count, FIELD_CHUNK):  # integers above 1 have a tail: the few, when levels are small
        long = np.flatnonzero(widths[start:start + FIELD_CHUNK])
        long_widths = widths[start + long].astype(np.uint64)
        first_bits = np.cumsum(long_widths) - long_widths + np.uint64(tails_read)
        integers[start + long] = read_fields(padded, first_bits, long_widths) | (1 << long_widths.astype(np.int64))
        tails_read += int(long_widths.sum())
    if count and integers.max() > largest:
        raise PayloadError(f"an Elias-gamma coded integer above {largest}")
    return integers


def signed_magnitudes(negative, magnitudes, one_group):
    """Per tensor, -m where the sign bit is set and +m elsewhere, m its group's magnitude (as float32)."""
    magnitude_of = iter(magnitudes)
    shared = next(magnitude_of) if one_group and magnitudes else None
    out = []
    for bits in negative:
        magnitude = shared if one_group else (next(magnitude_of) if len(bits) else 0.0)
        m = torch.tensor(magnitude, dtype=torch.float32, device=bits.device)
        out.append(torch.where(bits, -m, m))
    return out


def flat_bytes(tensors, dtype):
    if not tensors:
        return b""
    return torch.cat([t.reshape(-1) for t in tensors]).cpu().numpy().astype(dtype, copy=False).tobytes()


def pack_bits(bools):
    return np.packbits(torch.cat(bools).cpu().numpy()).tobytes() if bools else b""


def unpack_bits(reader, count):
    data = reader.array(np.uint8, math.ceil(count / 8))
    check_padding(data, count, "sign bits")
    return torch.from_numpy(np.unpackbits(data, count=count).astype(bool))


def read_scales(reader, count):
    scales = reader.array(SCALE_DTYPE, count).astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise PayloadError("a scale or magnitude is negative, NaN or Inf")
    return scales


def split(flat, counts):
    return list(flat.split(counts)) if counts else []


SPARSIFIERS = {cls.name: cls for cls in (RandomMask, TopK, Dense, Hybrid, PowerSGD)}
QUANTIZERS = {cls.name: cls for cls in (Float32, Float16, Int8, Sign, Ternary, QSGD)}
SPARSIFIER_IDS = {cls.wire_id: cls for cls in SPARSIFIERS.values()}
QUANTIZER_IDS = {cls.wire_id: cls for cls in QUANTIZERS.values()}


# ---- syncs: what a sampled client downloads to hold the server's model (downloads.py decides which) ---------------

REPLAY, CHANGED, DENSE = range(3)
SYNC_KINDS = {REPLAY: "replay", CHANGED: "changed", DENSE: "dense"}
COUNT = struct.Struct("<I")


def encode_sync(kind, content):
    """A sync: its kind u8, then for REPLAY the rounds missed (count u32, then per round its payloads: count u32, then
    each payload's length u32 and bytes), for CHANGED and DENSE one payload (its length is what is left)."""
    if kind != REPLAY:
        return bytes([kind]) + content
    parts = [bytes([REPLAY]), COUNT.pack(len(content))]
    for message in content:
        parts.append(COUNT.pack(len(message)))
        for payload in message:
            parts += [COUNT.pack(len(payload)), payload]
    return b"".join(parts)


def replay_size(messages):
    """The length of encode_sync(REPLAY, messages), without building it."""
    return 1 + COUNT.size * (1 + len(messages)) + sum(COUNT.size + len(p) for message in messages for p in message)


def decode_sync(sync, most_rounds):
    """(kind, content) of a sync: the rounds' payload lists for REPLAY, else the one payload (bytes). Every count is
    checked against the bytes present before anything is built from it, and a replay of more than `most_rounds` (the
    rounds played so far) is refused."""
    reader = Reader(sync)
    (kind,) = reader.unpack(struct.Struct("<B"))
    if kind not in SYNC_KINDS:
        raise PayloadError(f"unknown sync kind {kind}")
    if kind != REPLAY:
        return kind, bytes(reader.take(reader.remaining()))
    rounds = reader.count()
    if rounds > most_rounds:
        raise PayloadError(f"a replay of {rounds} rounds, where {most_rounds} have been played")
    messages = []
    for _ in range(rounds):
        messages.append([bytes(reader.take(reader.count(1))) for _ in range(reader.count())])
    if not reader.done():
        raise PayloadError(f"sync has {reader.remaining()} bytes after its last round")
    return kind, messages


class Reader:
    """Reads consecutive fields of a payload, failing cleanly when it is too short."""

    def __init__(self, payload):
        self.payload, self.offset = memoryview(payload), 0

    def take(self, size):
        if self.offset + size > len(self.payload):
            raise PayloadError("payload ends early")
        start, self.offset = self.offset, self.offset + size
        return self.payload[start:self.offset]

    def peek(self, start, size):
        """`size` bytes from `start` bytes past the current offset (fewer where the payload ends), not consumed."""
        return np.frombuffer(self.payload[self.offset + start:self.offset + start + size], dtype=np.uint8)

    def skip(self, size):
        self.take(size)

    def unpack(self, layout):
        return layout.unpack(self.take(layout.size))

    def array(self, dtype, count):
        dtype = np.dtype(dtype)
        return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype)

    def count(self, item_size=COUNT.size):
        """A u32 count of items that each take at least `item_size` bytes, refused when they cannot all be here."""
        (count,) = self.unpack(COUNT)
        self.require_bits(8 * count * item_size, f"{count} items")
        return count

    def require_bits(self, bits, what):
        """Refuse a claim the bytes left cannot hold, before anything the size of the claim is made."""
        if bits > 8 * self.remaining():
            raise PayloadError(f"{self.remaining()} bytes left cannot hold {what}")

    def remaining(self):
        return len(self.payload) - self.offset

    def done(self):
        return self.remaining() == 0
