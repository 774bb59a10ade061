"""The in-process engine's --parallel: clients trained at once on threads give, bit for bit, the run that trains them one
at a time with the same torch thread count; what cannot be run that way is refused in one line; a client's error
abandons its round without waiting for the others to finish training."""
import functools
import json
import math
import threading
import time

import pytest
import torch

import client
import federation
import main
from client_store import ClientStore
from conftest import kept_records, read_csv, without_seconds
from engines.inprocess import InProcess, check_parallel, torch_threads
from utils import partition, run_files
from utils.run_files import RunError

# error feedback on the simulated clock with over-selection (one of 3 sampled clients dropped a round, keeping its
# whole diff): the clients' state in the store and the drop path, besides the uploads
STATEFUL = {"global_epochs": 3, "k": 3, "sparsifier": "topk", "quantize": "ternary", "prop": 0.05,
            "error_feedback": True, "clock": "simulated", "profile": "mixed", "over_select": 1.5}


def run(conf, out, **engine):
    federation.run(conf, str(out), False, functools.partial(InProcess, **engine))
    return (without_seconds(read_csv(out / "metrics.csv")), run_files.load_checkpoint(str(out), "cpu")["model"],
            kept_records(out))


def same_model(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def same_records(a, b):
    return a.keys() == b.keys() and all(
        a[name].keys() == b[name].keys() and all(len(a[name][c]) == len(b[name][c]) and all(
            torch.equal(x, y) for x, y in zip(a[name][c], b[name][c])) for c in a[name]) for name in a)


@pytest.mark.parametrize("threads", [1, 2])
def test_clients_at_once_give_the_run_that_trains_them_one_at_a_time(make_conf, tmp_path, threads):
    """Two clients at once, each on `threads` torch threads, against one at a time on as many: metrics, the final model
    and every residual are the same bits. With 2 threads a client's training rounds differently than with 1 (checked
    here), so the threads ran with the count asked for, not with the one they happened to start with."""
    conf = make_conf(**STATEFUL)
    one_at_a_time = run(conf, tmp_path / "sequential", client_cpus=threads)
    at_once = run(conf, tmp_path / "parallel", parallel=2, client_cpus=threads)
    assert at_once[0] == one_at_a_time[0]
    assert all(row["dropped"] == "1" for row in at_once[0])
    assert same_model(at_once[1], one_at_a_time[1])
    assert same_records(at_once[2], one_at_a_time[2]) and len(at_once[2]["residual"]) == 4
    if threads == 2:
        other = run(conf, tmp_path / "one thread", client_cpus=1)
        assert not same_model(other[1], one_at_a_time[1])


def test_the_command_line_trains_at_once_and_records_the_thread_count(write_conf, tmp_path, run_main):
    out = tmp_path / "run"
    status, stdout, _ = run_main("-c", write_conf(k=3), "--out", out, "--parallel", "2")
    assert status == 0 and "done:" in stdout
    status, _, _ = run_main("-c", write_conf(k=3), "--out", tmp_path / "sequential", "--client-cpus", "1")
    assert status == 0
    assert without_seconds(read_csv(out / "metrics.csv")) == \
        without_seconds(read_csv(tmp_path / "sequential" / "metrics.csv"))
    environment = json.loads((out / "environment.json").read_text())
    assert environment[-1]["client_threads"] == 1  # the tests' one torch thread, shared out: at least one each
    assert main.engine_options(main.parse_args(["--parallel", "2", "--client-cpus", "1.5"])) == \
        " --parallel 2 --client-cpus 1.5"
    assert main.engine_options(main.parse_args([])) == ""


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "3"], "--parallel 3 is more than the 2 clients that train per round (k): give at most 2"),
    (["--parallel", "3", "--set", "k=3"], "--parallel 3 trains 3 clients at once on 3 torch threads in all "
                                          "(--client-cpus), and this machine has 2 CPUs: ask for at most 2"),
    (["--parallel", "2", "--client-cpus", "2"], "--parallel 2 trains 2 clients at once on 4 torch threads in all"),
    (["--client-cpus", "3"], "argument --client-cpus: '3' is more than this machine's 2 CPUs"),
    (["--client-cpus", "1e30"], "argument --client-cpus: '1e30' is more than this machine's 2 CPUs"),  # crashed torch
    (["--parallel", "2", "--set", "device=cuda"], "this run trains on cuda"),
])
def test_what_cannot_train_at_once_is_one_line(write_conf, tmp_path, run_main, monkeypatch, flags, message):
    monkeypatch.setattr(main, "cpus", lambda: 2)
    monkeypatch.setattr(federation, "pick_device", lambda asked: torch.device(asked if asked != "auto" else "cpu"))
    status, _, err = run_main("-c", write_conf(), "--out", tmp_path / "run", *flags)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


class Dropping(torch.nn.Module):
    def __init__(self, inputs, classes):
        super().__init__()
        self.linear = torch.nn.Linear(inputs, classes)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, images):
        return self.dropout(self.linear(images.flatten(1)))


def test_a_model_that_draws_from_the_global_generator_is_refused_and_the_generator_left_as_it_was(synthetic,
                                                                                                  make_conf):
    conf = make_conf()
    _, shares = partition.server_and_clients(synthetic, conf)
    inputs = synthetic.train_inputs[0].numel()
    dropping, still = Dropping(inputs, 10), Dropping(inputs, 10)
    still.dropout = torch.nn.Identity()
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    with pytest.raises(RunError, match="draws from torch's global random generator"):
        check_parallel(dropping, synthetic, shares, conf, 2)
    assert torch.equal(torch.random.get_rng_state(), state)
    check_parallel(still, synthetic, shares, conf, 2)  # draws nothing: accepted
    assert torch.equal(torch.random.get_rng_state(), state)


def dropping(input_shape, num_classes):
    """model_name "test_parallel:dropping"."""
    return Dropping(math.prod(input_shape), num_classes)


def test_a_dropping_model_is_refused_before_the_run_folder_is_made(write_conf, tmp_path, run_main):
    status, _, err = run_main("-c", write_conf(model_name="test_parallel:dropping"), "--out", tmp_path / "run",
                              "--parallel", "2")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "draws from torch's global random generator" in err
    assert not (tmp_path / "run").exists()


class Rare(Dropping):
    """Dropout on short batches only: the first batch, which the check before the first round trains on, is full."""

    def forward(self, images):
        out = self.linear(images.flatten(1))
        return self.dropout(out) if len(images) < 64 else out


def test_a_model_that_draws_on_some_batches_only_is_refused_at_the_end_of_the_round(synthetic, make_conf, tmp_path):
    conf = make_conf(k=4)  # batch_size 64: each client's 500 examples end on a batch of 52
    _, shares = partition.server_and_clients(synthetic, conf)
    workspace = Rare(synthetic.train_inputs[0].numel(), 10)
    store = ClientStore(str(tmp_path), client.kept_numels(conf, [p.shape for p in workspace.parameters()]), 100,
                        False)
    transport = InProcess(conf, synthetic, shares, workspace, store, parallel=2)  # the first batch draws nothing
    with pytest.raises(RunError, match="round 1: the model drew from torch's global random generator"):
        transport.train([0, 1, 2, 3], {}, workspace.state_dict(), 1)


class Slow(torch.nn.Module):
    """A linear model whose every forward takes 20 ms, counting them."""
    forwards = 0

    def __init__(self, inputs, classes):
        super().__init__()
        self.linear = torch.nn.Linear(inputs, classes)

    def forward(self, images):
        Slow.forwards += 1
        time.sleep(0.02)
        return self.linear(images.flatten(1))


def test_a_clients_error_abandons_the_round_without_training_the_others_to_the_end(synthetic, make_conf, tmp_path,
                                                                                   monkeypatch):
    conf = make_conf(no_models=4, k=4, batch_size=8)  # 750 examples a client: 94 steps, about 2 s each
    _, shares = partition.server_and_clients(synthetic, conf)
    workspace = Slow(synthetic.train_inputs[0].numel(), 10)
    store = ClientStore(str(tmp_path), client.kept_numels(conf, [p.shape for p in workspace.parameters()]), 100,
                        False)
    transport = InProcess(conf, synthetic, shares, workspace, store, parallel=2)
    train = client.Client.local_train

    def failing(self, *args, **kwargs):
        if self.id == 1:
            time.sleep(0.2)  # client 0 is training by now
            raise ValueError("client 1 failed")
        return train(self, *args, **kwargs)
    monkeypatch.setattr(client.Client, "local_train", failing)
    Slow.forwards = 0
    with pytest.raises(ValueError, match="client 1 failed"):
        transport.train([0, 1, 2, 3], {}, workspace.state_dict(), 1)
    assert 0 < Slow.forwards < 94  # client 0 gave up at its next step; clients 2 and 3 never started
    assert not [t for t in threading.enumerate() if t.name.startswith("client")]
    assert torch.get_num_threads() == 1  # the tests' count, put back


def test_the_thread_count_is_put_back_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(KeyError):
        with torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise KeyError
    assert torch.get_num_threads() == before
