"""Speed of the codec on a ResNet-18-sized diff (11.2M entries, the model's own tensor shapes): encode (select or
factor, code positions and values) and decode, per method, best of a few repeats (a benchmark, not a test).

    python benchmarks/codec_bench.py [--prop 0.01] [--repeats 5]

The caches of drawn random masks (codec/sparsifiers.py, MASKS and PACKED_MASKS) are off: every encode and decode
draws its mask, as a client and a server on different machines do. The last line is machine-readable: the slowest
method's encode and decode times in seconds, with the sizes.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import codec  # noqa: E402
import models  # noqa: E402
from codec import sparsifiers  # noqa: E402

sparsifiers.MASKS = sparsifiers.PACKED_MASKS = sparsifiers.NewestFirst(0)  # hold nothing: each repeat draws its mask

METHODS = {  # label: the config keys that choose the method
    "top-k per tensor, f32": {"sparsifier": "topk", "topk_scope": "tensor", "quantize": "none"},
    "top-k whole model, int8": {"sparsifier": "topk", "topk_scope": "model", "quantize": "int8"},
    "STC (top-k whole model, ternary)": {"sparsifier": "topk", "topk_scope": "model", "quantize": "ternary"},
    "random mask, f32": {"sparsifier": "random", "topk_scope": "tensor", "quantize": "none"},
    "dense, sign": {"sparsifier": "none", "topk_scope": "tensor", "quantize": "sign"},
    "dense, QSGD (s 4, buckets 512)": {"sparsifier": "none", "topk_scope": "tensor", "quantize": "qsgd"},
    "top-k whole model, QSGD": {"sparsifier": "topk", "topk_scope": "model", "quantize": "qsgd"},
    "hybrid (half top-k), ternary": {"sparsifier": "hybrid", "topk_scope": "model", "quantize": "ternary"},
    "hybrid (half top-k), QSGD": {"sparsifier": "hybrid", "topk_scope": "model", "quantize": "qsgd"},
    "PowerSGD rank 1, f32": {"sparsifier": "powersgd", "rank": 1, "topk_scope": "tensor", "quantize": "none"},
    "PowerSGD rank 4, f32": {"sparsifier": "powersgd", "rank": 4, "topk_scope": "tensor", "quantize": "none"},
}


def best_of(repeats, work):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prop", type=float, default=0.01, help="density of the sparse methods")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = models.build("resnet18", (3, 32, 32), 10)
    shapes = [t.shape for t in model.state_dict().values() if torch.is_floating_point(t)]
    numels = [shape.numel() for shape in shapes]
    diffs = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(numels)]
    print(f"ResNet-18 diff: {sum(numels):,} entries in {len(numels)} tensors, prop {args.prop}, "
          f"{torch.get_num_threads()} threads; dense payload {codec.dense_size(numels) / 1e6:.2f} MB")
    slowest = (0.0, 0.0)
    for label, keys in METHODS.items():
        conf = {"prop": args.prop, "levels": 4, "bucket_size": 512, "topk_share": 0.5, "rank": 2, **keys}
        # PowerSGD's first encode (no memory) draws its start; from a warm start it does the same work
        encode_seconds, encoded = best_of(args.repeats, lambda: codec.encode(conf, diffs, 500, 1, 2, shapes))
        decode_seconds, _ = best_of(args.repeats, lambda: codec.decode(encoded.payload, numels, conf))
        size = len(encoded.payload)
        print(f"{label:>34}: encode {encode_seconds * 1e3:7.1f} ms  decode {decode_seconds * 1e3:7.1f} ms  "
              f"{size / 1e3:9.1f} kB ({size / codec.dense_size(numels):.3%} of dense)")
        slowest = (max(slowest[0], encode_seconds), max(slowest[1], decode_seconds))
    print(f"slowest_encode_s={slowest[0]:.3f} slowest_decode_s={slowest[1]:.3f}")


if __name__ == "__main__":
    main()
