"""What the simulated clock costs: its share of a round's wall time, and its memory and sampling time at 100,000
clients.

    python benchmarks/clock_bench.py [--rounds 5]

1. A round of the default conf (the CNN on Fashion-MNIST, or synthetic data where it is not installed) is played with
   clock=simulated; the clock's own work in it (who is online, sampling, timing each client, the row's time columns)
   and writing clients.csv is timed apart, and printed as a share of the round's wall time. Target: at most 1%.
2. 100,000 clients under the 'mixed' preset with availability 0.5: the profiles' bytes (target: at most 10 MB) and
   the time to draw who is online and sample k=100 among them.
"""
import argparse
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clock  # noqa: E402
import federation  # noqa: E402
from engines.inprocess import InProcess  # noqa: E402
from utils import config, run_files  # noqa: E402


class TimedClock(clock.Clock):
    """The run's clock, with the seconds spent in it added up."""
    spent = 0.0

    def online(self, round_index):
        return self._timed(super().online, round_index)

    def sampled(self):
        return self._timed(super().sampled)

    def play(self, round_index, sizes):
        return self._timed(super().play, round_index, sizes)

    @staticmethod
    def _timed(work, *args):
        started = time.perf_counter()
        try:
            return work(*args)
        finally:
            TimedClock.spent += time.perf_counter() - started


def round_share(rounds, out):
    data = "fashion-mnist" if os.path.isdir("/usr/share/datasets/fashion-mnist") else "synthetic"
    conf = config.validate({**config.load("utils/conf.json"), "type": data, "global_epochs": rounds,
                            "clock": "simulated", "profile": "mixed", "availability": 0.9, "over_select": 1.5,
                            "data_dir": "./data"})
    original, write_csv = clock.Clock, run_files.write_csv

    def timed_write(path, columns, rows):  # clients.csv is the clock's too
        work = TimedClock._timed if path.endswith("clients.csv") else lambda f, *a: f(*a)
        return work(write_csv, path, columns, rows)
    clock.Clock, run_files.write_csv = TimedClock, timed_write  # federation.run builds its clock through the module
    try:
        rows = federation.run(conf, out, False, InProcess)
    finally:
        clock.Clock, run_files.write_csv = original, write_csv
    wall = sum(row["seconds"] for row in rows)
    print(f"{data}, {rounds} rounds: {wall:.2f} s of rounds, {TimedClock.spent * 1e3:.2f} ms in the clock: "
          f"{TimedClock.spent / wall:.4%} of a round's wall time (target: at most 1%)")


def many_clients(clients=100_000, k=100, rounds=20):
    tracemalloc.start()
    conf = {"clock": "simulated", "profile": "mixed", "no_models": clients, "seed": 0, "availability": 0.5}
    profiles = clock.Profiles.for_run(conf)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(a.nbytes for a in (profiles.uplink, profiles.downlink, profiles.latency, profiles.slowness,
                                  profiles.availability))
    started = time.perf_counter()
    for round_index in range(1, rounds + 1):
        online = profiles.online(0, round_index)
        federation.sample_clients({"no_models": clients, "k": k, "seed": 0}, round_index, online, k)
    per_round = (time.perf_counter() - started) / rounds
    print(f"{clients:,} clients: profiles hold {held / 1e6:.1f} MB (peak while drawn {peak / 1e6:.1f} MB; target: "
          f"at most 10 MB); who is online ({len(online):,} of them) and sampling {k}: {per_round * 1e3:.2f} ms a round")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="/tmp/fedsparse-clock-bench", help="a folder for the benchmark's run")
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        print(f"error: {args.out} holds a run: remove it or give another --out", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    many_clients()
    round_share(args.rounds, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
