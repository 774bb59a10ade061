"""How much of a client's update a rank-r factorization keeps, against the largest entries: a diagnostic for
PowerSGD's gap to STC (docs/results.md).

    python figures/lowrank.py RUN_DIR [--round 30] [--client 0]

From a finished run's checkpoint (its global model after the last round), the client trains one round as it would
in round `--round`, and its diff is measured: per weight matrix (conv kernels as rows x rest, PowerSGD's view) the
share of its squared norm in its r largest singular values (numpy's SVD: the best any rank-r method can keep), the
share one power step from a random start keeps (what PowerSGD keeps on a client's first upload, before warm starts
help), and, over the whole diff, the share in its largest 1% and 4% of entries (what top-k, and so STC, selects).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import models  # noqa: E402
from client import Client  # noqa: E402
from utils import config, partition, run_files  # noqa: E402

RANKS = (1, 4)
TOP_SHARES = (0.01, 0.04)


def kept_share(singular_values, rank):
    squares = singular_values ** 2
    return squares[:rank].sum() / squares.sum()


def power_step_share(matrix, rank, generator):
    """||P P^T M||^2 / ||M||^2 for P the orthonormalized M Q, Q a standard normal start."""
    start = generator.standard_normal((matrix.shape[1], rank))
    p, _ = np.linalg.qr(matrix @ start)
    return np.linalg.norm(p.T @ matrix) ** 2 / np.linalg.norm(matrix) ** 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--round", type=int, default=30, help="the round whose seeds the client trains with")
    parser.add_argument("--client", type=int, default=0)
    args = parser.parse_args(argv)
    conf = config.validate(run_files.read_config(args.run_dir))
    data = datasets.load(conf["type"], conf["data_dir"], torch.device("cpu"))
    _, shares = partition.server_and_clients(data, conf)
    model = models.for_data(conf["model_name"], data)
    global_state = run_files.load_checkpoint(args.run_dir, "cpu")["model"]
    Client(args.client, shares[args.client], conf).local_train(model, global_state, data, args.round)
    diffs = {name: (model.state_dict()[name] - value).double().numpy()
             for name, value in global_state.items() if torch.is_floating_point(value)}
    generator = np.random.default_rng(0)
    print(f"{args.run_dir}: client {args.client}'s diff after one local round from the final model")
    print("| weight | matrix | " + " | ".join(f"best rank {r} | one power step, rank {r}" for r in RANKS) + " |")
    print("|---|---|" + "---|---|" * len(RANKS))
    for name, diff in diffs.items():
        if diff.ndim < 2:
            continue
        matrix = diff.reshape(diff.shape[0], -1)
        singular_values = np.linalg.svd(matrix, compute_uv=False)
        cells = [f"{kept_share(singular_values, r):.1%} | {power_step_share(matrix, r, generator):.1%}"
                 for r in RANKS if r < min(matrix.shape)]
        print(f"| {name} | {matrix.shape[0]} x {matrix.shape[1]} | " + " | ".join(cells) + " |")
    squares = np.sort(np.concatenate([d.ravel() for d in diffs.values()]) ** 2)[::-1]
    print("whole diff: " + ", ".join(f"its largest {share:.0%} of entries hold "
                                     f"{squares[:int(np.ceil(share * len(squares)))].sum() / squares.sum():.1%}"
                                     for share in TOP_SHARES) + " of its squared norm")


if __name__ == "__main__":
    main()
