"""Cross-device scale, measured side by side in one run (a benchmark, not a test). Fashion-MNIST, the default CNN.

    python benchmarks/cross_device.py [--rounds 3] [--long-rounds 20] [--big-rounds 30] [--speed-only]

1. 1000 clients (59 examples each), 100 per round: the simulator's time per round, training one client at a time and
   with --parallel 2 (two at once, a torch thread each), against a plain loop doing the same SGD steps and evaluation
   one client at a time (benchmarks/bench.py's), alternated three times, the fastest of each kept; for the default
   conf and for STC both ways with error feedback.
2. The STC run for `--long-rounds` rounds, in a fresh process: its peak resident memory so far, its save's time (the
   client store's records and checkpoint.pt) and checkpoint.pt's size, at round 1 and at the last round.
3. 6000 clients (9 or 10 examples each), 100 per round, STC with error feedback, `client_state_memory` 1000 MB, for
   `--big-rounds` rounds, in a fresh process: peak resident memory (the kernel's high-water mark of the process's
   pages, what `/usr/bin/time -v` reports as "Maximum resident set size"), the client store's size, and the last round (its
   save included) against round 2 (and, less noisy, the last 5 rounds against rounds 2 to 6).
`--speed-only` runs part 1 alone (its spread over a few runs is the noisiest figure). The last line is
machine-readable: default=<simulator/plain> default_parallel=<simulator --parallel 2/plain> stc=... stc_parallel=...
big_rss_mb=<MB> big_last_over_second=<round 30 / round 2>.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench  # noqa: E402
import datasets  # noqa: E402
import federation  # noqa: E402
from engines.inprocess import InProcess  # noqa: E402
from utils import allocator, config  # noqa: E402

CROSS_DEVICE = {"no_models": 1000, "k": 100}
STC_BOTH_WAYS = {"sparsifier": "topk", "topk_scope": "model", "quantize": "ternary", "prop": 0.04,
                 "error_feedback": True, "download": "compressed", "download_prop": 0.02}
PARALLEL = 2  # clients at once in the second simulator run (--parallel), one torch thread each on 2 cores
BIG = {"no_models": 6000, "k": 100, "client_state_memory": 1000, **STC_BOTH_WAYS}


def make_conf(overrides):
    return config.validate({**config.load(os.path.join(ROOT, "utils", "conf.json")), **overrides})


def side_by_side(conf):
    """(simulator seconds per round, the same with --parallel 2, plain loop seconds per round): each timed three times,
    alternately, the fastest kept (on this machine a loop's time varies by up to 30% from one run to the next)."""
    started = time.perf_counter()
    dataset = datasets.load(conf["type"], conf["data_dir"], federation.pick_device(conf["device"]))
    load_seconds = time.perf_counter() - started
    shares, rounds = bench.schedule(conf, dataset)
    plain, simulator, parallel = [], [], []
    for _ in range(3):
        plain.append(bench.time_plain(conf, dataset, shares, rounds))
        simulator.append(bench.time_simulator(conf, load_seconds))
        parallel.append(bench.time_simulator(conf, load_seconds, functools.partial(InProcess, parallel=PARALLEL)))
    return min(simulator) / len(rounds), min(parallel) / len(rounds), min(plain) / len(rounds)


def probe(conf):
    """Run `conf` in this process; print JSON: per round its seconds, its save's seconds and the checkpoint's bytes,
    the client store's bytes, and the peak resident memory in MB."""
    saves, sizes, peaks, save = [], [], [], federation.save

    def timed_save(out, *args, **kwargs):
        started = time.perf_counter()
        save(out, *args, **kwargs)
        saves.append(time.perf_counter() - started)
        sizes.append(os.path.getsize(os.path.join(out, "checkpoint.pt")))
        peaks.append(bench.peak_memory_mb())  # so far
    federation.save = timed_save
    with tempfile.TemporaryDirectory(dir=ROOT) as out:  # on the disk the runs go to, not a RAM-backed /tmp
        rows = federation.run(conf, out, False, InProcess)
        store = os.path.join(out, "clients")
        store_bytes = sum(os.path.getsize(os.path.join(store, f)) for f in os.listdir(store)) \
            if os.path.isdir(store) else 0
    print(json.dumps({"seconds": [row["seconds"] for row in rows], "saves": saves, "checkpoint_bytes": sizes,
                      "store_bytes": store_bytes, "peaks_mb": peaks,
                      "peak_mb": bench.peak_memory_mb()}))


def in_fresh_process(overrides):
    command = [sys.executable, os.path.abspath(__file__), "--probe", json.dumps(overrides)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"error: the probe failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds timed in each loop of part 1")
    parser.add_argument("--long-rounds", type=int, default=20, help="rounds of part 2")
    parser.add_argument("--big-rounds", type=int, default=30, help="rounds of part 3")
    parser.add_argument("--speed-only", action="store_true", help="run part 1 alone")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    allocator.keep_freed_memory()  # as main.py runs: for the simulator and the plain loop alike
    if args.probe:
        probe(make_conf(json.loads(args.probe)))
        return

    ratios = {}
    for name, method in (("default", {}), ("stc", STC_BOTH_WAYS)):
        conf = make_conf({**CROSS_DEVICE, **method, "global_epochs": args.rounds})
        simulator, parallel, plain = side_by_side(conf)
        ratios[name], ratios[f"{name}_parallel"] = simulator / plain, parallel / plain
        print(f"1000 clients, k=100, {name:>7}: simulator {simulator:.2f} s/round, with --parallel {PARALLEL} "
              f"{parallel:.2f} s/round, plain loop {plain:.2f} s/round: {ratios[name]:.3f}x and "
              f"{ratios[f'{name}_parallel']:.3f}x", flush=True)
    speed = " ".join(f"{name}={ratio:.3f}" for name, ratio in ratios.items())
    if args.speed_only:
        print(speed)
        return

    long = in_fresh_process({**CROSS_DEVICE, **STC_BOTH_WAYS, "global_epochs": args.long_rounds})
    print(f"1000 clients, k=100, STC, {args.long_rounds} rounds: peak memory {long['peaks_mb'][0]:.0f} MB after "
          f"round 1, {long['peaks_mb'][-1]:.0f} MB after round {args.long_rounds}; save "
          f"{long['saves'][0]:.3f} s at round 1, {long['saves'][-1]:.3f} s at round {args.long_rounds}; checkpoint.pt "
          f"{long['checkpoint_bytes'][0] / 1e6:.2f} MB at round 1, {long['checkpoint_bytes'][-1] / 1e6:.2f} MB at "
          f"round {args.long_rounds}; client store {long['store_bytes'] / 1e6:.0f} MB", flush=True)

    big = in_fresh_process({**BIG, "global_epochs": args.big_rounds})
    rounds = [seconds + save for seconds, save in zip(big["seconds"], big["saves"])]
    print(f"6000 clients, k=100, STC, client_state_memory 1000, {args.big_rounds} rounds: peak memory "
          f"{big['peak_mb']:.0f} MB; client store {big['store_bytes'] / 1e9:.2f} GB; round 2 {rounds[1]:.2f} s "
          f"(save {big['saves'][1]:.2f} s), round {args.big_rounds} {rounds[-1]:.2f} s "
          f"(save {big['saves'][-1]:.2f} s): {rounds[-1] / rounds[1]:.3f}x; the last 5 rounds against rounds 2 to 6, "
          f"mean: {sum(rounds[-5:]) / sum(rounds[1:6]):.3f}x")
    print(f"{speed} big_rss_mb={big['peak_mb']:.0f} big_last_over_second={rounds[-1] / rounds[1]:.3f}")


if __name__ == "__main__":
    main()
