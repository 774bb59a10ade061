"""Compression methods and the upload's wire format: `encode` (the client's side) is the only code that writes an
upload, `decode` (the server's side) the only code that reads one, and an upload's size is the length of its bytes.

A method is a sparsifier times a quantizer, each one class registered by its config name in SPARSIFIERS
(codec/sparsifiers.py) or QUANTIZERS (codec/quantizers.py); config choices, plot labels and the tables of
docs/compression.md derive from these registries. A sparsifier turns the diffs into coefficients, groups of values,
and the receiver's decoded groups back into the diff it reconstructs: most select entries (a group per tensor: its kept
entries), PowerSGD factors matrices (two groups per factored tensor: its factors). The quantizer writes the groups'
values. Sparse Ternary Compression (Sattler et al. 2019) is TopK over the whole model times Ternary, with error
feedback. To add a method, write one class and register it. Kept positions are coded in codec/positions.py; the
reading primitives, which refuse every claim the bytes present cannot hold, are codec/wire.py.

Layout, little-endian; tensors are the model's floating-point state-dict entries, flattened, in order:
    header      version u8 | sparsifier id u8 | quantizer id u8 | num_samples u32 | num_tensors u32
    sparsifier  none:   nothing (every entry travels)
                random: mask_seed u64 | prop f64; the receiver regenerates the Bernoulli(prop) mask
                topk:   coding u8 | count u32 | the kept positions over the flattened model, coded as a bitmap,
                        a list of u8/u16/u32 indices, or Golomb-Rice gaps, whichever is smallest (codec/positions.py)
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
                      nonzero level |
                fixed: bits b u8 | range f64 | every value's code q + 2^(b-1) - 1 in b bits (q in -(2^(b-1) - 1) ..
                       2^(b-1) - 1), most significant first; the value is q times the step (quantizers.fixed_step)
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
import struct
from dataclasses import dataclass

import numpy as np
import torch

from codec.positions import encode_positions
from codec.quantizers import QUANTIZERS, Float32
from codec.sparsifiers import SPARSIFIERS, Dense, TopK, entries
from codec.wire import COUNT, PayloadError, Reader


VERSION = 2
HEADER = struct.Struct("<BBBII")


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


DENSE_F32 = {"sparsifier": Dense.name, "quantize": Float32.name}  # a model, exactly: a dense sync, a client's state
CHANGED_ENTRIES = {"sparsifier": TopK.name, "quantize": Float32.name}  # encode_entries' method, of any count


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


def with_num_samples(payload, num_samples):
    """`payload`, a well-formed upload, claiming `num_samples` examples instead (only its header changes)."""
    version, sparsifier_id, quantizer_id, _, num_tensors = HEADER.unpack_from(payload)
    return HEADER.pack(version, sparsifier_id, quantizer_id, num_samples, num_tensors) + payload[HEADER.size:]


def dense_size(numels):
    """Bytes of a dense f32 payload of a model with `numels` entries per tensor (a dense upload, or the download)."""
    return HEADER.size + 4 * sum(numels)


def memory_numels(conf, shapes):
    """Per tensor, the entries of the memory a sender keeps between encodes under `conf`'s sparsifier (for tensors of
    `shapes`); None when it keeps none."""
    return SPARSIFIERS[conf["sparsifier"]](conf).memory_numels(shapes)


def all_finite(tensors):
    """Whether every entry of `tensors` is finite. On the CPU through numpy, 14 times faster than torch's isfinite
    and all (0.025 against 0.35 ms for 240,000 f32 values): the server checks every upload's values."""
    return all(np.isfinite(t.detach().numpy()).all() if t.device.type == "cpu" else bool(torch.isfinite(t).all())
               for t in tensors)


SPARSIFIER_IDS = {cls.wire_id: cls for cls in SPARSIFIERS.values()}
QUANTIZER_IDS = {cls.wire_id: cls for cls in QUANTIZERS.values()}
REPLAY, CHANGED, DENSE = range(3)
SYNC_KINDS = {REPLAY: "replay", CHANGED: "changed", DENSE: "dense"}


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
