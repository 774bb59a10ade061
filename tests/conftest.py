"""Shared fixtures: a tiny config builder, a tiny model, and a helper that runs main.main and captures its output."""
import contextlib
import json
import os
import random
import socket
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The test machine has 2 cores shared with other work: one intra-op thread avoids oversubscription, which can make
# small CNN steps an order of magnitude slower. Results do not depend on it (every test compares within one process
# or against hand-computed values).
torch.set_num_threads(1)

import datasets  # noqa: E402
import main  # noqa: E402
from utils import config  # noqa: E402

# Small end-to-end settings: 4 clients of 750 synthetic examples, 2 sampled per round.
TINY = {"type": "synthetic", "no_models": 4, "k": 2, "global_epochs": 3, "batch_size": 64, "lr": 0.05}


def free_ports(count):
    """The first of `count` consecutive ports that are free on 127.0.0.1 now."""
    while True:
        base = random.randrange(20000, 60000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    return str(path)


@pytest.fixture
def make_conf(data_dir):
    """Build a validated config dict: TINY settings, a temporary data_dir, then the given overrides."""
    def build(**overrides):
        return config.validate({**TINY, "data_dir": data_dir, **overrides})
    return build


@pytest.fixture
def write_conf(tmp_path, data_dir):
    """Write a JSON conf file (TINY settings plus overrides, data_dir in tmp) and return its path."""
    counter = [0]

    def write(**overrides):
        counter[0] += 1
        path = tmp_path / f"conf{counter[0]}.json"
        path.write_text(json.dumps({**TINY, "data_dir": data_dir, **overrides}))
        return str(path)
    return write


@pytest.fixture
def run_main(capsys):
    """Call main.main(argv); returns (exit status, stdout, stderr)."""
    def call(*argv):
        status = main.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return call


@pytest.fixture
def tiny_model():
    """nn.Linear(3, 2) with known weights: weight [[1,2,3],[4,5,6]] (flat 1..6), bias [0.5, -0.5]."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.arange(1.0, 7.0).view(2, 3))
        model.bias.copy_(torch.tensor([0.5, -0.5]))
    return model


@pytest.fixture
def offline(monkeypatch):
    """torchvision's downloads fail at once, as on a machine without internet."""
    def refuse(self, *args, **kwargs):
        raise RuntimeError("no internet in this test")
    for name in datasets.BUILTINS:
        monkeypatch.setattr(datasets.torchvision_class(name), "download", refuse)


@pytest.fixture(scope="session")
def synthetic():
    return datasets.load("synthetic", "unused", torch.device("cpu"))


def read_csv(path):
    """metrics.csv as a list of dicts of strings (plain csv module, independent of utils.run_files)."""
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def handmade_upload(num_samples, diffs, kept=None):
    """An upload written by hand from codec/__init__.py's documented layout (not by its encoder): per tensor, the f32 values of
    `diffs` (lists) at the positions `kept` (lists), sent as an index list over the flattened model; dense when
    `kept` is None."""
    import struct
    header = struct.pack("<BBBII", 2, 0 if kept is None else 2, 0, num_samples, len(diffs))  # version 2, f32 values
    if kept is None:
        return header + b"".join(struct.pack(f"<{len(d)}f", *d) for d in diffs)
    total, offset, flat, values = sum(len(d) for d in diffs), 0, [], []
    for diff, positions in zip(diffs, kept):
        flat += [offset + p for p in positions]
        values += [diff[p] for p in positions]
        offset += len(diff)
    coding, letter = (1, "B") if total <= 256 else (2, "H") if total <= 65536 else (3, "I")
    return (header + struct.pack("<BI", coding, len(flat)) + struct.pack(f"<{len(flat)}{letter}", *flat)
            + struct.pack(f"<{len(values)}f", *values))


def lenient(server):
    """`server`, decoding any well-formed upload: hand-made ones carry f32 values at positions of a test's choosing,
    which no run's method sends (a run's server decodes only its own method: codec.decode)."""
    server.method = None
    return server


def dense_from(positions, values, numels):
    """Scatter decoded (positions, values) into zero tensors: the masked diff the server sees."""
    out = []
    for kept, value, numel in zip(positions, values, numels):
        full = torch.zeros(numel)
        if kept is None:
            full[:] = value
        else:
            full[kept] = value
        out.append(full)
    return out


def kept_records(run_dir):
    """What a finished run's clients keep, {name: {client: flat f32 tensors}}, read from its client store's files at
    the slots its checkpoint names (each record: the client's tensors, f32, one after another, at the start of a slot
    of slot_bytes)."""
    import numpy as np
    from utils import run_files
    table = run_files.load_checkpoint(str(run_dir), "cpu")["store"]
    kept = {}
    for name, records in table["records"].items():
        numels, floats = table["numels"][name], table["slot_bytes"][name] // 4
        values = np.fromfile(os.path.join(run_dir, "clients", {"residual": "residuals", "memory": "memories"}[name]
                                          + ".bin"), dtype="<f4")
        kept[name] = {c: list(torch.from_numpy(values[slot * floats:slot * floats + sum(numels)].copy())
                              .split(numels)) for c, (slot, _) in records.items()}
    return kept
