"""Speed and memory of the simulator, measured side by side in one run (a benchmark, not a test).

    python benchmarks/bench.py [--rounds 3] [--set KEY=VALUE ...]

On the same model, data and number of SGD steps and evaluations it times, three times alternately, the fastest of each
kept:
  (a) the simulator: federation.run for a few rounds (data loading excluded, checkpoints included), training one
      client at a time, and with --parallel 2 (two at once, on a thread each);
  (b) a plain training loop over the same tensors in memory: the compute limit;
  (c) a chapter-style loop: torchvision dataset with per-sample ToTensor through DataLoaders, a model object per
      client in PyTorch's default memory format, state-dict copies, evaluation through a DataLoader of the training
      batch size.
Then it measures the simulator's peak memory (one round, in a fresh process) with 10 and with 1000 clients.
The last line is machine-readable:
    overhead=<simulator/plain> parallel=<simulator/simulator --parallel 2> speedup=<chapter/simulator>
    memory_ratio=<1000 clients/10 clients>
"""
import argparse
import copy
import functools
import gzip
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.data import DataLoader, SubsetRandomSampler  # noqa: E402

import datasets  # noqa: E402
import federation  # noqa: E402
import models  # noqa: E402
from engines.inprocess import InProcess  # noqa: E402
from server import EVAL_BATCH_SIZE  # noqa: E402
from utils import allocator, config, partition  # noqa: E402
from utils.seeding import generator  # noqa: E402


def schedule(conf, dataset):
    """The clients' index shares and each round's sampled clients, exactly as the simulator draws them."""
    _, shares = partition.server_and_clients(dataset, conf)
    return shares, [federation.sample_clients(conf, r) for r in range(1, conf["global_epochs"] + 1)]


def time_simulator(conf, dataset_load_seconds, transport_factory=InProcess):
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        federation.run(conf, out, False, transport_factory)
        return time.perf_counter() - started - dataset_load_seconds


def time_plain(conf, dataset, shares, rounds):
    """One model, SGD over in-memory tensors, the same steps and evaluations, nothing federated."""
    torch.manual_seed(0)
    model = models.for_data(conf["model_name"], dataset).to(dataset.train_inputs.device)
    started = time.perf_counter()
    for round_index, chosen in enumerate(rounds, 1):
        for client_id in chosen:
            optimizer = torch.optim.SGD(model.parameters(), lr=conf["lr"], momentum=conf["momentum"])
            shuffle = generator(conf["seed"], "shuffle", round_index, client_id)
            model.train()
            for _ in range(conf["local_epochs"]):
                for images, labels in dataset.train_batches(shares[client_id], conf["batch_size"], shuffle):
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(model(images), labels).backward()
                    optimizer.step()
        model.eval()
        with torch.no_grad():
            for start in range(0, len(dataset.test_labels), EVAL_BATCH_SIZE):
                model(dataset.test_inputs[start:start + EVAL_BATCH_SIZE]).argmax(1)
    return time.perf_counter() - started


def torchvision_fashion_mnist(root):
    """torchvision's FashionMNIST over the IDX files the simulator found (unzipped into torchvision's layout)."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    builtin = datasets.BUILTINS["fashion-mnist"]
    source = next(d for d in [*builtin.system_dirs, os.path.join(ROOT, "data", "FashionMNIST", "raw")]
                  if os.path.isdir(d))
    for name in sum(datasets.IDX_NAMES.values(), ()):
        gz = os.path.join(source, name + ".gz")
        with (gzip.open(gz) if os.path.exists(gz) else open(os.path.join(source, name), "rb")) as f, \
                open(os.path.join(raw, name), "wb") as target:
            shutil.copyfileobj(f, target)
    transform = torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                                torchvision.transforms.Normalize(builtin.mean, builtin.std)])
    return [torchvision.datasets.FashionMNIST(root, train=train, transform=transform) for train in (True, False)]


def time_chapter(conf, dataset, shares, rounds, root):
    """The chapter's structure: a model and a DataLoader per client, masks stored per client, dict-of-diffs."""
    train_set, test_set = torchvision_fashion_mnist(root)
    torch.manual_seed(0)
    global_model = models.for_data(conf["model_name"], dataset)
    global_model = global_model.to(memory_format=torch.contiguous_format)  # the chapter's models use the default
    clients = []
    for client_id, share in enumerate(shares):
        local_model = copy.deepcopy(global_model)
        mask = {name: torch.bernoulli(torch.ones_like(p) * conf["prop"])
                for name, p in local_model.state_dict().items()}
        loader = DataLoader(train_set, batch_size=conf["batch_size"], sampler=SubsetRandomSampler(share.tolist()))
        clients.append((local_model, mask, loader))
    eval_loader = DataLoader(test_set, batch_size=conf["batch_size"])
    started = time.perf_counter()
    for chosen in rounds:
        accumulator = {name: torch.zeros_like(p) for name, p in global_model.state_dict().items()}
        for client_id in chosen:
            local_model, mask, loader = clients[client_id]
            for name, param in global_model.state_dict().items():
                local_model.state_dict()[name].copy_(param.clone())
            optimizer = torch.optim.SGD(local_model.parameters(), lr=conf["lr"], momentum=conf["momentum"])
            local_model.train()
            for _ in range(conf["local_epochs"]):
                for images, labels in loader:
                    optimizer.zero_grad()
                    F.cross_entropy(local_model(images), labels).backward()
                    optimizer.step()
            for name, data in local_model.state_dict().items():
                accumulator[name].add_((data - global_model.state_dict()[name]) * mask[name])
        for name, data in global_model.state_dict().items():
            data.add_((accumulator[name] / len(chosen)).to(data.dtype))
        global_model.eval()
        with torch.no_grad():
            for images, labels in eval_loader:
                F.cross_entropy(global_model(images), labels, reduction="sum").item()
    return time.perf_counter() - started


def peak_memory(clients, overrides):
    """Peak resident memory (MB) of one simulator round with `clients` clients, in a fresh process."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", str(clients)]
    for key, value in overrides:
        command += ["--set", f"{key}={value}"]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(result.stdout.strip().splitlines()[-1])


def memory_probe(conf):
    with tempfile.TemporaryDirectory() as out:
        federation.run(conf, out, False, InProcess)
    print(peak_memory_mb())


def peak_memory_mb():
    """This process's peak resident memory so far, in MB: the kernel's high-water mark of its own pages (VmHWM), where
    /proc has it. Not getrusage's ru_maxrss: a process started by another inherits its starter's peak there, so a probe
    started by a benchmark that had grown to 2.7 GB reported 2.7 GB whatever it used (as `/usr/bin/time -v`, a small
    starter, does not)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def main_bench():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds timed in each loop")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    allocator.keep_freed_memory()  # as main.py runs: for the simulator and the plain loop alike
    overrides = [config.parse_assignment(a) for a in args.set]
    conf = config.validate({**config.load(os.path.join(ROOT, "utils", "conf.json")), **dict(overrides)})
    if args.memory_probe:
        memory_probe({**conf, "no_models": args.memory_probe, "global_epochs": 1})
        return
    conf["global_epochs"] = args.rounds
    if conf["type"] != "fashion-mnist":
        sys.exit("error: the chapter-style loop is written for type fashion-mnist")

    started = time.perf_counter()
    dataset = datasets.load(conf["type"], conf["data_dir"], federation.pick_device(conf["device"]))
    load_seconds = time.perf_counter() - started
    shares, rounds = schedule(conf, dataset)
    samples = sum(len(shares[c]) for chosen in rounds for c in chosen) * conf["local_epochs"]
    samples += len(dataset.test_labels) * len(rounds)
    print(f"{conf['type']}, {conf['model_name']}, {conf['no_models']} clients, k={conf['k']}, "
          f"{len(rounds)} rounds: {samples} samples (training + evaluation) per loop, "
          f"{torch.get_num_threads()} threads")

    timings = {"chapter": [], "plain": [], "simulator": [], "parallel": []}
    for _ in range(3):  # alternated, the fastest of each kept: a loop's time varies by up to 30% from run to run here
        with tempfile.TemporaryDirectory() as root:
            timings["chapter"].append(time_chapter(conf, dataset, shares, rounds, root))
        timings["plain"].append(time_plain(conf, dataset, shares, rounds))
        timings["simulator"].append(time_simulator(conf, load_seconds))
        timings["parallel"].append(time_simulator(conf, load_seconds, functools.partial(InProcess, parallel=2)))
    chapter, plain, simulator, parallel = (min(timings[name]) for name in ("chapter", "plain", "simulator",
                                                                           "parallel"))
    for name, seconds in (("simulator", simulator), ("--parallel 2", parallel), ("plain loop", plain),
                          ("chapter-style", chapter)):
        print(f"{name:>14}: {seconds:7.2f} s  {samples / seconds:8.0f} samples/s")
    small, large = peak_memory(10, overrides), peak_memory(1000, overrides)
    print(f"peak memory, one round: 10 clients {small:.0f} MB, 1000 clients {large:.0f} MB")
    print(f"overhead={simulator / plain:.3f} parallel={simulator / parallel:.3f} speedup={chapter / simulator:.3f} "
          f"memory_ratio={large / small:.3f}")


if __name__ == "__main__":
    main_bench()
