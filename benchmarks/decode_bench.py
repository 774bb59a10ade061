"""What decoding costs the server on a ResNet-18-sized model (11.2M entries, the model's own tensor sizes): peak memory
above what the process held before, and seconds, for the largest honest upload of every method and for hostile ones,
each decoded as a server configured for that method decodes it, and the hostile ones also by a server of another
method (a benchmark, not a test: seconds depend on the machine).

    python benchmarks/decode_bench.py

Targets (issue "Reliability and security, third pass"): a hostile payload is rejected or decoded within +300 MB and
1 s; one of a method the run did not configure is rejected in under 10 ms. The last line is machine-readable.
"""
import math
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import codec  # noqa: E402
import models  # noqa: E402
from utils import config, measure  # noqa: E402

STC = {"sparsifier": "topk", "topk_scope": "model", "quantize": "ternary", "prop": 0.04}
HONEST = {  # label: the run's method; its largest upload is encoded from a random diff (prop 1 where prop counts)
    "dense f32": {"sparsifier": "none", "quantize": "none"},
    "dense f16": {"sparsifier": "none", "quantize": "f16"},
    "dense int8": {"sparsifier": "none", "quantize": "int8"},
    "dense sign": {"sparsifier": "none", "quantize": "sign"},
    "dense QSGD, 4 levels": {"sparsifier": "none", "quantize": "qsgd"},
    "dense QSGD, 65535 levels": {"sparsifier": "none", "quantize": "qsgd", "levels": 65535},
    "random mask 100%, f32": {"sparsifier": "random", "quantize": "none", "prop": 1.0},
    "top-k 100% per tensor, f32": {"sparsifier": "topk", "quantize": "none", "prop": 1.0},
    "STC 4%": STC,
    "hybrid 100%, ternary": {"sparsifier": "hybrid", "quantize": "ternary", "prop": 1.0},
    "hybrid 100% random, sign": {"sparsifier": "hybrid", "quantize": "sign", "prop": 1.0, "topk_share": 0.0},
    "PowerSGD rank 4, f32": {"sparsifier": "powersgd", "quantize": "none", "rank": 4},
}


def header(sparsifier, quantizer, numels):
    return codec.HEADER.pack(codec.VERSION, sparsifier.wire_id, quantizer.wire_id, 1, len(numels))


def gamma_bomb(numels, size=23_800_000):
    """Dense QSGD claiming 65535 levels, its Elias-gamma lengths all ones bytes up to `size`."""
    buckets = sum(math.ceil(n / 512) for n in numels)
    head = (header(codec.sparsifiers.Dense, codec.quantizers.QSGD, numels)
            + codec.quantizers.QSGD_HEADER.pack(65535, 512) + bytes(4 * buckets))
    return head + b"\xff" * (size - len(head))


def all_random_hybrid(numels):
    """A hybrid upload of no top-k positions and every entry drawn at random, sign-coded: 1.4 MB."""
    positions = (codec.positions.POSITIONS_HEADER.pack(codec.positions.INDEX_U32, 0)
                 + codec.sparsifiers.HYBRID_RANDOM.pack(7, sum(numels)))
    return (header(codec.sparsifiers.Hybrid, codec.quantizers.Sign, numels) + positions
            + struct.pack(f"<{len(numels)}f", *[1.0] * len(numels)) + bytes(math.ceil(sum(numels) / 8)))


def hostile(numels):
    """label: (payload, the method of the run that accepts its kind and parameters)."""
    bomb, hybrid = gamma_bomb(numels), all_random_hybrid(numels)
    return {
        "QSGD gamma bomb, 23.8 MB": (bomb, HONEST["dense QSGD, 65535 levels"]),
        "hybrid all random, 1.4 MB": (hybrid, HONEST["hybrid 100% random, sign"]),
        "the same, cut by 10 bytes": (hybrid[:-10], HONEST["hybrid 100% random, sign"]),
    }


def show(label, run, payload, numels):
    outcome, grown, seconds, _ = measure.cost(lambda: codec.decode(payload, numels, run))
    verdict = "decoded" if isinstance(outcome, tuple) else f"rejected ({outcome})"
    if not isinstance(outcome, (tuple, codec.PayloadError)):
        raise outcome
    print(f"{label:>44}: {len(payload) / 1e6:6.2f} MB  +{grown / 1e6:6.0f} MB  {seconds:6.3f} s  {verdict[:90]}")
    return grown, seconds


def main():
    model = models.build("resnet18", (3, 32, 32), 10)
    shapes = [t.shape for t in model.state_dict().values() if torch.is_floating_point(t)]
    numels = [shape.numel() for shape in shapes]
    del model
    print(f"ResNet-18: {sum(numels):,} entries in {len(numels)} tensors, {torch.get_num_threads()} threads")
    diffs = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(numels)]
    worst = [0, 0.0, 0.0]  # peak growth, seconds of a hostile payload; seconds of another method's refusal
    for label, method in HONEST.items():
        run = config.validate(method)
        payload = codec.encode(run, diffs, 500, 1, 2, shapes).payload
        show(f"honest {label}", run, payload, numels)
    del diffs
    for label, (payload, method) in hostile(numels).items():
        grown, seconds = show(label, config.validate(method), payload, numels)
        worst[:2] = max(worst[0], grown), max(worst[1], seconds)
        worst[2] = max(worst[2], show("  in an STC run", config.validate(STC), payload, numels)[1])
    print(f"hostile_peak_mb={worst[0] / 1e6:.0f} hostile_seconds={worst[1]:.3f} "
          f"other_method_ms={worst[2] * 1e3:.2f}")


if __name__ == "__main__":
    main()
