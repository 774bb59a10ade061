"""What a defense costs the server: the time of one round's receive (decode every upload) and aggregate (the defense
and the step) on ResNet-18-sized uploads of k clients, per defense, against no defense, side by side in one run (a
benchmark, not a test).

    python benchmarks/defense_bench.py [--clients 10] [--prop 0.01] [--repeats 3]

Two kinds of upload: dense f32 and STC (top-k over the whole model at `prop`, ternary). Each round is timed from the
same encoded payloads, best of a few repeats. The last line is machine-readable: the slowest defense's time over no
defense's, for each kind of upload.
"""
import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import codec  # noqa: E402
import models  # noqa: E402
import robust  # noqa: E402
from server import Server  # noqa: E402
from utils import config  # noqa: E402

UPLOADS = {  # label: the config keys of the clients' method
    "dense f32": {"sparsifier": "none", "quantize": "none"},
    "STC": {"sparsifier": "topk", "topk_scope": "model", "quantize": "ternary"},
}


def round_seconds(model, conf, payloads, repeats):
    """Best of `repeats`: a fresh server on a fresh copy of `model` receives the payloads and aggregates them."""
    best = float("inf")
    for _ in range(repeats):
        server = Server(copy.deepcopy(model), conf, torch.device("cpu"))
        started = time.perf_counter()
        for client_id, payload in enumerate(payloads):
            assert server.receive(payload, client_id) is None
        assert server.aggregate() is None
        best = min(best, time.perf_counter() - started)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="uploads per round (k)")
    parser.add_argument("--prop", type=float, default=0.01, help="density of the STC uploads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = models.build("resnet18", (3, 32, 32), 10)
    numels = [t.numel() for t in model.state_dict().values() if torch.is_floating_point(t)]
    print(f"ResNet-18: {sum(numels):,} entries in {len(numels)} tensors, {args.clients} uploads per round, "
          f"{torch.get_num_threads()} threads")
    ratios = {}
    for label, keys in UPLOADS.items():
        payloads = []
        for client_id in range(args.clients):
            draw = torch.Generator().manual_seed(client_id)
            diffs = [0.01 * torch.randn(n, generator=draw) for n in numels]
            payloads.append(codec.encode({"prop": args.prop, **keys}, diffs, 500).payload)
        seconds = {}
        for defense in robust.DEFENSES:
            conf = config.validate({"model_name": "resnet18", "no_models": args.clients, "k": args.clients,
                                    "prop": args.prop, "defense": defense, **keys})
            seconds[defense] = round_seconds(model, conf, payloads, args.repeats)
            print(f"{label:>10}, {defense:>16}: {seconds[defense]:6.2f} s per round "
                  f"({seconds[defense] / seconds['none']:4.1f}x no defense)")
        ratios[label] = max(seconds.values()) / seconds["none"]
    print(" ".join(f"slowest_{label.split()[0].lower()}_ratio={ratio:.2f}" for label, ratio in ratios.items()))


if __name__ == "__main__":
    main()
