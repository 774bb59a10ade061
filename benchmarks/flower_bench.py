"""Time per round of --engine flower against the in-process engine, side by side in one run, and the memory of the
Flower simulation with 10 and with 1000 clients (a benchmark, not a test).

    python benchmarks/flower_bench.py [--rounds 4] [--set KEY=VALUE ...]

Each run is `python main.py` in a process of its own, at the default conf unless --set says otherwise:
  in-process       the default engine, with this machine's torch threads;
  flower, 1 actor  one client trains at a time, on one Ray actor that has all those threads;
  flower, 2 actors two clients train at once, each actor on its share of the threads.
Per-round time is the mean of metrics.csv's `seconds` (train, receive, aggregate, evaluate) after the first round;
start-up (imports, data, Ray and its actors, node discovery) is the wall time the rounds do not account for.
Memory is the peak resident memory summed over the run's whole process tree (driver, Ray's daemons, actors), sampled
every 0.2 s, in one round with 10 and with 1000 clients. The last line is machine-readable:
    one_actor_ratio=<flower 1 actor / in-process> two_actor_ratio=<flower 2 actors / in-process> memory_ratio=<1000/10>
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}


def tree_rss_mb(root_pid):
    """Resident memory (MB) of a process and all its descendants, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def run(options, sets, rounds):
    """(mean seconds per round after the first, start-up seconds, peak MB of the process tree) of one main.py run."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "run")
        command = [sys.executable, "main.py", "-c", "utils/conf.json", "--set", f"global_epochs={rounds}",
                   *[arg for s in sets for arg in ("--set", s)], "--out", out, *options]
        started, peak = time.perf_counter(), 0.0
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        while process.poll() is None:
            peak = max(peak, tree_rss_mb(process.pid))
            time.sleep(0.2)
        wall = time.perf_counter() - started
        output = process.stdout.read()
        if process.returncode != 0:
            sys.exit(f"error: {' '.join(command)} failed:\n{output[-2000:]}")
        with open(os.path.join(out, "metrics.csv"), newline="") as f:
            seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    later = seconds[1:] or seconds
    return sum(later) / len(later), wall - sum(seconds), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per timed run (the first is not averaged)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    import torch
    threads = torch.get_num_threads()
    print(f"default conf {' '.join(args.set)}, {args.rounds} rounds per run, {threads} torch threads, "
          f"{os.cpu_count()} CPUs")
    engines = {
        "in-process": [],
        "flower, 1 actor": ["--engine", "flower", "--parallel", "1", "--client-cpus", str(threads)],
        "flower, 2 actors": ["--engine", "flower", "--parallel", "2", "--client-cpus", str(max(1, threads // 2))],
    }
    per_round = {}
    for name, options in engines.items():
        seconds, startup, peak = run(options, args.set, args.rounds)
        per_round[name] = seconds
        print(f"{name:>17}: {seconds:6.2f} s per round, start-up {startup:5.1f} s, peak memory {peak:6.0f} MB")
    memory = {}
    for clients in (10, 1000):
        _, startup, peak = run(engines["flower, 1 actor"], args.set + [f"no_models={clients}"], 1)
        memory[clients] = peak
        print(f"flower, 1 actor, {clients:>4} clients, one round: peak memory {peak:6.0f} MB, "
              f"start-up {startup:5.1f} s")
    print(f"one_actor_ratio={per_round['flower, 1 actor'] / per_round['in-process']:.3f} "
          f"two_actor_ratio={per_round['flower, 2 actors'] / per_round['in-process']:.3f} "
          f"memory_ratio={memory[1000] / memory[10]:.3f}")


if __name__ == "__main__":
    main()
