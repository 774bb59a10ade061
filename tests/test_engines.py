"""Engines: the in-process loop, Flower's simulation engine and a local Flower deployment give identical metrics
(state carried across rounds and across a resume included); Flower nodes that fail, time out or answer garbage are left
out of their round and the run goes on; the simulation's Ray listens on 127.0.0.1 only, and its flags are checked before
it starts; the in-process path never imports Flower."""
import copy
import glob
import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from types import SimpleNamespace

import pytest
import torch

import codec
import downloads
import engines
import federation
import main
import secure
from client import kept_numels
from client_store import ClientStore
from conftest import ROOT, TINY, free_ports, kept_records, read_csv, without_seconds
from server import Server
from utils import config, run_files

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
# STC with error feedback and server momentum, and a compressed download: state on the clients (residuals, the
# nodes' models) and on the server (momentum, its residual, the message log), carried from round to round
# on the simulated clock, 3 of the 4 clients sampled a round (over-selection) and the first 2 kept: the dropped one's
# residual keeps its whole diff, on every engine
STATEFUL = {**TINY, "global_epochs": 2, "sparsifier": "topk", "topk_scope": "model", "quantize": "ternary",
            "prop": 0.05, "error_feedback": True, "server_momentum": 0.5, "download": "compressed",
            "clock": "simulated", "profile": "mixed", "over_select": 1.5}


def run_command(*argv, timeout=600):
    result = subprocess.run([str(a) for a in argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    """(conf file for 2 rounds, metrics of the 6-round in-process run)."""
    base = tmp_path_factory.mktemp("engines")
    conf = base / "conf.json"
    conf.write_text(json.dumps({**STATEFUL, "data_dir": str(base / "data")}))
    assert main.main(["-c", str(conf), "--set", "global_epochs=6", "--out", str(base / "inprocess")]) == 0
    metrics, clients = (read_csv(base / "inprocess" / name) for name in ("metrics.csv", "clients.csv"))
    assert all(row["dropped"] == "1" for row in metrics)
    return conf, without_seconds(metrics), clients


def rounds_of(clients, rounds):
    return [row for row in clients if int(row["round"]) <= rounds]


def test_flower_simulation_stopped_and_resumed_equals_the_in_process_loop(stateful, tmp_path):
    conf, expected, clients = stateful
    out = tmp_path / "flower"
    # two actors: a stop must wait for both to finish their message (it used to hang at exit in 2 of 3 tries)
    process = subprocess.Popen([sys.executable, "main.py", "-c", str(conf), "--set", "global_epochs=6",
                                "--out", str(out), "--engine", "flower", "--parallel", "2"], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "metrics.csv").exists():  # a round is saved: stop it as a scheduler would
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and len(err.strip().splitlines()) == 1, err
    command = shlex.split(err.split("continue with:")[1])
    assert command[:2] == ["python", "main.py"] and command[-8:-4] == ["--engine", "flower", "--timeout", "600"]
    assert "--parallel" in command and "2" in command
    saved = without_seconds(read_csv(out / "metrics.csv"))
    assert 1 <= len(saved) < 6 and saved == expected[:len(saved)]
    resumed = run_command(sys.executable, *command[1:])
    assert "resuming" in resumed.stdout and "done:" in resumed.stdout
    assert without_seconds(read_csv(out / "metrics.csv")) == expected
    assert read_csv(out / "clients.csv") == clients


def test_flower_simulation_listens_on_loopback_only_with_the_actors_asked_for(write_conf, tmp_path):
    """Ray has no authentication: everything it starts for a run (GCS, raylet, agents, workers, this driver) listens on
    127.0.0.1 only. Half a CPU per actor (Ray wants whole numbers for its node) gives the two actors asked for."""
    command = [sys.executable, "main.py", "-c", write_conf(), "--out", tmp_path / "run", "--engine", "flower",
               "--parallel", "2", "--client-cpus", "0.5"]
    process = subprocess.Popen([str(a) for a in command], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    listening, actors, deadline = set(), set(), time.monotonic() + 600
    try:
        while process.poll() is None and time.monotonic() < deadline:  # sampled for the run's whole life
            tree = process_tree(process.pid)
            listening |= listening_sockets(tree)
            actors |= {pid for pid, line in tree.items() if line.startswith("ray::ClientAppActor")}
            time.sleep(0.1)
    finally:
        process.kill()  # a no-op once the run has ended
        _, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    assert {"gcs_server", "raylet"} <= {program for _, program in listening}  # the sampling saw Ray's daemons
    exposed = sorted((str(address), program) for address, program in listening if not loopback(address))
    assert exposed == []
    assert len(actors) == 2


def process_tree(root):
    """{pid: command line} of process `root` and its descendants, from /proc (Ray renames its workers there)."""
    children, commands = {}, {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                commands[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = commands.get(pid, "")
        todo += children.get(pid, [])
    return tree


def listening_sockets(tree):
    """{(IP address, program)} of the TCP sockets that the processes `tree` listen on, from /proc/net/tcp and tcp6
    (whose rows name a socket by inode) and the processes' file descriptors (which point at those inodes)."""
    owner = {}
    for pid, line in tree.items():
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[len("socket:["):-1]] = os.path.basename(line.split(" ")[0])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in list(f)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in owner:  # state 0A: LISTEN
                    found.add((proc_net_address(fields[1]), owner[fields[9]]))
    return found


def proc_net_address(text):
    """The IP address of /proc/net/tcp's ADDRESS:PORT: hex, in 32-bit words of the machine's byte order (little)."""
    hex_address = text.split(":")[0]
    return ipaddress.ip_address(b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1]
                                         for i in range(0, len(hex_address), 8)))


def loopback(address):
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how a dual-stack socket shows 127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_a_local_deployment_stopped_and_continued_equals_the_in_process_loop(stateful, tmp_path):
    """deploy/local.sh with TLS and SuperNode authentication, stopped by SIGTERM after a round is saved; the command
    it prints continues on a new rehearsal, to the same metrics as the in-process loop."""
    conf, expected, clients = stateful
    out, tmp = tmp_path / "deployed", tmp_path / "tmp"
    tmp.mkdir()
    env = {**ENV, "TMPDIR": str(tmp)}  # the rehearsal's $FLWR_HOME, its credentials and logs, are made under tmp
    port = free_ports(5)  # the SuperLink's, then the 4 nodes'
    options = ["--nodes", "4", "--port", str(port), "--node-port", str(port + 1)]
    process = subprocess.Popen(["bash", os.path.join(ROOT, "deploy", "local.sh"), *options, "--", "-c", str(conf),
                                "--set", "global_epochs=4", "--out", str(out)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "metrics.csv").exists():  # a round is saved: stop the job as a scheduler would
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    logs = glob.glob(str(tmp / "fedsparse-flower.*" / "logs"))[0]  # kept after a stop; the credentials are not
    assert f"Uvicorn running on https://127.0.0.1:{port}" in open(os.path.join(logs, "superlink.log")).read()
    assert all("registered successfully" in open(os.path.join(logs, f"register-{i}.log")).read() for i in range(4))
    assert not glob.glob(str(tmp / "fedsparse-flower.*" / "credentials"))
    command = shlex.split(err.split("continue on a new rehearsal with:")[1].splitlines()[0])
    assert command == ["deploy/local.sh", *options, "--", "-c", str(conf), "--set", "global_epochs=4",
                       "--out", str(out), "--resume"]
    saved = without_seconds(read_csv(out / "metrics.csv"))
    assert 1 <= len(saved) < 4 and saved == expected[:len(saved)]
    resumed = subprocess.run(["bash", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "done:" in resumed.stdout
    assert without_seconds(read_csv(out / "metrics.csv")) == expected[:4]
    assert read_csv(out / "clients.csv") == rounds_of(clients, 4)
    leftovers = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout == ""  # every process the script started (each names its $FLWR_HOME) is gone


def test_deploy_script_refuses_bad_options():
    result = subprocess.run(["bash", os.path.join(ROOT, "deploy", "local.sh"), "--", "-c", "x.json"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1


# ---- faults: a fake grid whose nodes misbehave as each test says --------------------------------------------------

@pytest.fixture
def flower(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    from engines import flower
    for field, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):  # what a ServerApp's process has set
        monkeypatch.setattr(TaskIdentity, field, value)
    return flower


class FakeGrid:
    """Flower's Grid as GridTransport uses it; node p holds partition p and answers "train" with behaviours[p]."""

    def __init__(self, behaviours):
        self.behaviours, self.replies = behaviours, {}
        self.partition_of = {1000 + p: p for p in behaviours}

    def get_node_ids(self):
        return list(self.partition_of)

    def push_messages(self, messages):
        from flwr.app import ConfigRecord, Message, RecordDict
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = str(uuid.uuid4())
            ids.append(message_id)
            partition = self.partition_of[message.metadata.dst_node_id]
            if message.metadata.message_type == "query":
                reply = Message(RecordDict({"node": ConfigRecord({"partition": partition})}), reply_to=message)
            else:
                reply = self.behaviours[partition](message)
            if reply is not None:
                self.replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def upload_reply(client_id, values, payload=None, **record):
    """A node's reply carrying a dense upload of `values` for nn.Linear(3, 2) from 10 examples."""
    def reply(message):
        from flwr.app import ConfigRecord, Message, RecordDict
        data = payload if payload is not None else dense(values, num_samples=10)
        received = codec.decode(message.content.config_records["task"]["sync"], [6, 2])[2]  # the dense model
        fields = {"client": client_id, "payload": data, "train_loss": 0.5, "checksum": downloads.checksum(received),
                  **record}
        return Message(RecordDict({"upload": ConfigRecord(fields)}), reply_to=message)
    return reply


def dense(value, num_samples=0, numels=(6, 2)):
    """A dense codec payload of `value` in every entry of tensors of `numels` entries (nn.Linear(3, 2)'s)."""
    return codec.encode({"sparsifier": "none", "quantize": "none"}, [torch.full((n,), value) for n in numels],
                        num_samples).payload


def failing(message):
    from flwr.app import Error, Message
    return Message(Error(code=0, reason="CUDA out of memory"), reply_to=message)


def garbage(message):
    from flwr.app import ConfigRecord, Message, RecordDict
    return Message(RecordDict({"something": ConfigRecord({"else": 1})}), reply_to=message)


def one_round(flower, tiny_model, make_conf, behaviours, timeout=5.0, **overrides):
    """(the round's metrics row, the transport) of one round in which node p answers with behaviours[p]."""
    conf = make_conf(**{"no_models": len(behaviours), "k": len(behaviours), "sparsifier": "none", "aggregation": "mean",
                        **overrides})
    server = Server(tiny_model, conf, torch.device("cpu"))
    settings = {"timeout": timeout, "threads": 1}
    shapes = [t.shape for t in server.globals]
    store = ClientStore(tempfile.mkdtemp(), kept_numels(conf, shapes), 1024, False)
    transport = flower.GridTransport(FakeGrid(behaviours), conf, shapes, settings, flower.threading.Event(), store,
                                     [10] * len(behaviours))
    test_split = SimpleNamespace(test_inputs=torch.ones(4, 3), test_labels=torch.tensor([0, 1, 0, 1]), num_classes=2)
    return federation.play_round(1, conf, server, transport, test_split), server, transport


def test_failing_silent_or_garbled_nodes_are_left_out_of_the_round(flower, tiny_model, make_conf, capsys):
    before = tiny_model.weight.detach().clone()
    behaviours = {0: upload_reply(0, 1.0), 1: failing, 2: lambda message: None, 3: garbage,
                  4: upload_reply(3, 1.0), 5: upload_reply(5, 1.0, payload=b"\x02\x00garbage"),
                  6: upload_reply(6, 3.0)}
    row, _, _ = one_round(flower, tiny_model, make_conf, behaviours, timeout=0.5)
    err = capsys.readouterr().err
    assert row["rejected"] == 5 and row["refused"] == 0
    for client, reason in ((1, "CUDA out of memory"), (2, "no reply within 0.5 s"), (3, "malformed"),
                           (4, "another client"), (5, "malformed payload")):
        assert f"client {client}'s upload" in err and reason in err, (client, reason)
    # the two good uploads, 10 examples each: the global model moves by their mean, (1 + 3) / 2
    assert torch.allclose(tiny_model.weight.detach(), before + 2.0)
    # counted: the uploads handed to the server (two good, one undecodable); not: replies no upload could be taken from
    assert row["upload_bytes"] == 2 * (11 + 4 * 8) + len(b"\x02\x00garbage")


def test_a_node_whose_model_is_not_the_servers_is_left_out_and_resynchronized(flower, tiny_model, make_conf,
                                                                              capsys):
    behaviours = {0: upload_reply(0, 1.0), 1: upload_reply(1, 1.0, checksum="0" * 64)}
    row, server, _ = one_round(flower, tiny_model, make_conf, behaviours)
    assert row["rejected"] == 1
    assert "client 1's upload: the node's model after its sync is not the server's" in capsys.readouterr().err
    assert server.syncs.synced == {0: 0, 1: downloads.UNKNOWN}  # its next sync is the dense model


def test_a_reply_with_any_bad_field_is_left_out_and_the_round_saves(flower, tiny_model, make_conf, capsys):
    sparse = codec.encode(make_conf(sparsifier="topk", prop=0.5), [torch.ones(6), torch.ones(2)], 0).payload
    bad_fields = {1: dict(residual=b"\x02\x00garbage"), 2: dict(residual=dense(0.1, numels=(5, 2))),
                  3: dict(residual=dense(float("nan"))), 4: dict(residual=sparse), 5: dict(residual="0.1"),
                  6: {}, 7: dict(residual=dense(0.1), train_loss="0.5"), 8: dict(residual=dense(0.1), client="8"),
                  9: dict(residual=dense(0.1), payload="bytes")}
    behaviours = {0: upload_reply(0, 1.0, residual=dense(0.25)),
                  **{p: upload_reply(p, 1.0, **fields) for p, fields in bad_fields.items()}}
    row, _, transport = one_round(flower, tiny_model, make_conf, behaviours, error_feedback=True)
    err = capsys.readouterr().err
    assert row["rejected"] == len(bad_fields) and row["refused"] == 0
    for client, reason in ((1, "residual is not a dense payload for this model"), (2, "payload ends early"),
                           (3, "residual holds NaN or Inf"), (4, "residual is not a dense payload for this model "
                                                                 "(sparsifier topk and quantize none, where"),
                           (5, "residual is not bytes"),
                           (6, "residual is missing: error feedback is on"), (7, "train_loss '0.5' is not a number"),
                           (8, "another client"), (9, "payload is not bytes")):
        assert f"client {client}'s upload: the node's reply is malformed" in err and reason in err, (client, reason)
    # what the checkpoint saves: only the good reply's residual (a garbled one used to crash the save)
    assert transport.store.clients("residual") == {0}
    assert all(torch.equal(r, torch.full_like(r, 0.25)) for r in transport.store.get("residual", 0))


def test_a_reply_with_a_bad_warm_start_is_left_out_and_a_good_one_saved_and_handed_back(flower, tiny_model,
                                                                                           make_conf, capsys):
    """Under powersgd at rank 1, a client of nn.Linear(3, 2) keeps Q' of its 2 x 3 weight (3 entries) and nothing of
    its bias: its node's reply must carry exactly that, dense, finite."""
    memory = dense(0.5, numels=(3, 0))
    sparse = codec.encode(make_conf(sparsifier="topk", prop=0.5), [torch.ones(3), torch.ones(0)], 0).payload
    bad_fields = {1: {}, 2: dict(memory=dense(0.5, numels=(2, 0))), 3: dict(memory=dense(float("nan"), numels=(3, 0))),
                  4: dict(memory=sparse), 5: dict(memory="0.5")}
    upload = codec.encode({"sparsifier": "powersgd", "quantize": "none", "rank": 1}, [torch.ones(6), torch.ones(2)],
                          10, shapes=[(2, 3), (2,)]).payload  # the run's method, which its server alone decodes
    behaviours = {0: upload_reply(0, 1.0, payload=upload, memory=memory),
                  **{p: upload_reply(p, 1.0, **fields) for p, fields in bad_fields.items()}}
    row, server, transport = one_round(flower, tiny_model, make_conf, behaviours, sparsifier="powersgd", rank=1)
    err = capsys.readouterr().err
    assert row["rejected"] == len(bad_fields)
    for client, reason in ((1, "memory is missing: the powersgd sparsifier keeps one"), (2, "payload ends early"),
                           (3, "memory holds NaN or Inf"), (4, "memory is not a dense payload for this model "
                                                               "(sparsifier topk and quantize none, where"),
                           (5, "memory is not bytes")):
        assert f"client {client}'s upload: the node's reply is malformed" in err and reason in err, (client, reason)
    assert transport.store.clients("memory") == {0}
    assert [m.tolist() for m in transport.store.get("memory", 0)] == [[0.5] * 3, []]
    transport.restore_client_state(transport.client_state())  # as after a resume: handed back with the next message
    sent, answer = {}, behaviours[0]

    def hand_back(message):
        sent.update(message.content.config_records["task"])
        return answer(message)
    transport.grid.behaviours[0] = hand_back
    transport.train([0], {0: server.sync(0)[0]}, server.global_state(), 2)
    assert sent["memory"] == memory
    # a memory under a sparsifier that keeps none is as malformed
    row, _, _ = one_round(flower, tiny_model, make_conf, {0: upload_reply(0, 1.0, memory=memory)})
    assert row["rejected"] == 1 and "its memory is unexpected: the none sparsifier keeps none" in capsys.readouterr().err


@pytest.mark.parametrize("method", [
    dict(sparsifier="powersgd", rank=1, download="compressed", download_sparsifier="powersgd",
         download_quantize="none"),
    dict(sparsifier="topk", prop=0.1, clock="simulated", over_select=1.5),  # one of 3 dropped a round
    dict(sparsifier="topk", prop=0.1, clock="simulated", mode="async", concurrency=3, buffer_size=2,
         download="compressed"),  # FedBuff: one client at a time, each synced to the model current at its start
])
def test_nodes_keep_residuals_and_warm_starts_across_rounds_and_a_resume(flower, make_conf, tmp_path, method):
    """Nodes that run the real ClientApp, each with its own context.state, over the fake grid: stopped after two
    rounds and restarted empty (as a new simulation's nodes are), they get back what they kept from the server's
    checkpoint, and the run ends as the in-process loop does. PowerSGD's warm start and error feedback are state that
    changes every upload, under a compressed PowerSGD download; under over-selection a dropped client's residual is
    its whole diff."""
    from flwr.app import Context, RecordDict
    from engines.inprocess import InProcess
    conf = make_conf(global_epochs=4, error_feedback=True, **method)
    expected = federation.run(conf, str(tmp_path / "inprocess"), False, InProcess)

    def grid_of_new_nodes(conf, dataset, shares, workspace, store):
        contexts = [Context(run_id=1, node_id=1000 + p, node_config={"partition-id": p}, state=RecordDict(),
                            run_config={}) for p in range(conf["no_models"])]
        grid = FakeGrid({p: (lambda message, p=p: flower.train(message, contexts[p])) for p in range(len(contexts))})
        shapes = [t.shape for t in workspace.state_dict().values() if torch.is_floating_point(t)]
        return flower.GridTransport(grid, conf, shapes, {"timeout": 60.0, "threads": 1}, flower.threading.Event(),
                                    store, [len(share) for share in shares])
    out = str(tmp_path / "grid")
    federation.run({**conf, "global_epochs": 2}, out, False, grid_of_new_nodes)
    rows = federation.run(conf, out, True, grid_of_new_nodes)
    assert without_seconds(rows) == without_seconds(expected)
    # bit for bit, not only to the metrics' 6 decimals: an ulp of a warm start a round hid there
    kept, grid_kept = (kept_records(tmp_path / run) for run in ("inprocess", "grid"))
    if conf["over_select"] > 1:
        assert sum(row["dropped"] for row in rows) == 4
    assert kept.keys() == grid_kept.keys() and all(kept.values())
    for name in kept:
        assert kept[name].keys() == grid_kept[name].keys()
        assert all(torch.equal(a, b) for c in kept[name] for a, b in zip(kept[name][c], grid_kept[name][c])), name


def test_a_round_without_an_accepted_upload_keeps_the_global_model(flower, tiny_model, make_conf, capsys):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    row, _, _ = one_round(flower, tiny_model, make_conf, {0: failing, 1: garbage})
    assert row["rejected"] == 2 and row["refused"] == 1 and row["train_loss"] != row["train_loss"]  # NaN
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert "the global model stays as it was" in capsys.readouterr().err


def test_a_hostile_nodes_upload_meets_the_defense_as_an_in_process_clients_does(flower, tiny_model, make_conf):
    """An admitted node uploading 1e30 in every entry: under defense=median the step is the per-entry median of the
    three nodes' uploads, 1, 2 and 1e30 -> 2, as robust.py computes it for in-process clients."""
    before = tiny_model.weight.detach().clone()
    behaviours = {0: upload_reply(0, 1.0), 1: upload_reply(1, 2.0), 2: upload_reply(2, 1e30)}
    row, _, _ = one_round(flower, tiny_model, make_conf, behaviours, defense="median")
    assert row["rejected"] == 0 and row["refused"] == 0
    assert torch.equal(tiny_model.weight.detach(), before + 2.0)


def test_missing_nodes_are_one_clear_error(flower, make_conf):
    conf, settings = make_conf(no_models=3, k=2), {"timeout": 0.5, "threads": 1}
    with pytest.raises(federation.RunError, match="only 2 of 3 nodes connected after 0.5 s"):
        flower.GridTransport(FakeGrid({0: garbage, 1: garbage}), conf, [(2, 3), (2,)], settings,
                             flower.threading.Event(), None, [10, 10, 10])
    with pytest.raises(federation.RunError, match="no node holds partition-id 1"):  # three nodes, one misconfigured
        flower.GridTransport(FakeGrid({0: garbage, 2: garbage, 5: garbage}), conf, [(2, 3), (2,)], settings,
                             flower.threading.Event(), None, [10, 10, 10])


# ---- the simulation's flags: checked before Ray starts ------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--timeout", "inf"], "argument --timeout: 'inf' is not a finite number"),
    (["--timeout", "nan"], "argument --timeout: 'nan' is not a finite number"),
    (["--timeout", "1e10"], "argument --timeout: '1e10' is more than"),  # a wait beyond threading.TIMEOUT_MAX
    (["--client-cpus", "inf"], "argument --client-cpus: 'inf' is not a finite number"),
    (["--client-gpus", "inf"], "argument --client-gpus: 'inf' is not a finite number"),
    (["--client-gpus", "1.5"], "'1.5' is neither a share of one GPU (0.0001 to 1) nor a whole number"),
    (["--client-gpus", "0.00001"], "'0.00001' is neither a share of one GPU"),
    (["--parallel", "3"], "--parallel 3 is more than the 2 clients that train per round (k)"),
    (["--client-gpus", "0.5"], "--client-gpus 0.5 with --parallel 1 needs 1 GPU(s); CUDA sees 0 here"),
])
def test_bad_simulation_flags_are_one_line(write_conf, tmp_path, run_main, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without CUDA
    status, _, err = run_main("-c", write_conf(), "--out", tmp_path / "run", "--engine", "flower", *flags)
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_share_of_a_gpu_asks_ray_for_whole_gpus():
    assert [engines.node_gpus(0.5, 1), engines.node_gpus(0.5, 2), engines.node_gpus(0.6, 2)] == [1, 1, 2]
    assert engines.node_gpus(0.28, 25) == 7 and engines.node_gpus(0.0, 4) == 0  # 0.28 * 25 is 7.000000000000001


# ---- Flower stays out of the in-process path ---------------------------------------------------------------------

def test_missing_flower_is_one_line(write_conf, tmp_path, run_main, monkeypatch):
    import engines
    monkeypatch.setitem(sys.modules, "engines.flower", None)  # as if flwr were not installed
    monkeypatch.delattr(engines, "flower", raising=False)
    status, _, err = run_main("-c", write_conf(), "--out", tmp_path / "run", "--engine", "flower")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "pip install 'flwr[simulation]'" in err


def test_the_in_process_engine_never_imports_flower(write_conf, tmp_path):
    script = ("import sys, main; status = main.main(['-c', sys.argv[1], '--out', sys.argv[2]]); "
              "print(status, any(m == 'flwr' or m.startswith(('flwr.', 'ray')) for m in sys.modules))")
    result = run_command(sys.executable, "-c", script, write_conf(global_epochs=1), tmp_path / "run")
    assert result.stdout.strip().splitlines()[-1] == "0 False"


# ---- secure aggregation on Flower: SecAgg+ for real ---------------------------------------------------------------

SECURE = {"sparsifier": "none", "quantize": "fixed", "fixed_bits": 8, "fixed_range": 0.01, "secure_aggregation": True}


def grid_of_secagg_nodes(flower):
    """A transport factory whose nodes are this process's ClientApp, each message passing through the app's mod
    (secaggplus_mod for SecAgg+'s stages), with a context per node kept across messages as Flower keeps it."""
    from flwr.app import Context, RecordDict
    from engines import secagg

    def factory(conf, dataset, shares, workspace, store):
        contexts = [Context(run_id=1, node_id=1000 + p, node_config={"partition-id": p}, state=RecordDict(),
                            run_config={}) for p in range(conf["no_models"])]
        # each node gets its own copy, as it would over the wire: the workflow sends one content to every node, and
        # secaggplus_mod pops from it
        grid = FakeGrid({p: (lambda message, p=p: secagg.mod(copy.deepcopy(message), contexts[p], flower.train))
                         for p in range(len(contexts))})
        shapes = [t.shape for t in workspace.state_dict().values() if torch.is_floating_point(t)]
        return flower.GridTransport(grid, conf, shapes, {"timeout": 60.0, "threads": 1}, flower.threading.Event(),
                                    store, [len(share) for share in shares])
    return factory


@pytest.mark.parametrize("method", [
    {"aggregation": "mean", "download": "compressed", "server_momentum": 0.5},
    # DP under secure aggregation: the clients clip, weigh 1, and send only the round's shared mask; Poisson sampling
    # takes 4, 3 and 4 of the 4 clients at seed 0
    {"sparsifier": "random", "mask": "shared", "prop": 0.3, "dp_clip": 0.1, "dp_noise_multiplier": 0.5, "k": 3,
     "server_validation": 0},
])
def test_flowers_secagg_plus_steps_as_the_simulated_secure_aggregation(flower, make_conf, tmp_path, method):
    from engines.inprocess import InProcess
    conf = make_conf(**{**SECURE, "global_epochs": 3, **method})
    expected = federation.run(conf, str(tmp_path / "simulated"), False, InProcess)
    rows = federation.run(conf, str(tmp_path / "secagg"), False, grid_of_secagg_nodes(flower))
    assert without_seconds(rows) == without_seconds(expected)
    assert [row["refused"] for row in rows] == [0, 0, 0] and all(row["rejected"] == 0 for row in rows)
    models = [run_files.load_checkpoint(str(tmp_path / run), "cpu")["model"] for run in ("simulated", "secagg")]
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])


def test_a_garbled_node_in_secagg_plus_costs_its_rounds_not_the_run(flower, make_conf, tmp_path, capsys):
    conf = make_conf(**{**SECURE, "global_epochs": 2, "no_models": 4, "k": 3})
    honest = grid_of_secagg_nodes(flower)

    def factory(conf, dataset, shares, workspace, store):
        transport = honest(conf, dataset, shares, workspace, store)
        transport.grid.behaviours[3] = garbage  # answers every stage with a record SecAgg+ does not know
        return transport
    rows = federation.run(conf, str(tmp_path / "run"), False, factory)
    err = capsys.readouterr().err
    for row in rows:
        if "3" in row["clients"].split():
            assert row["rejected"] == 3 and row["refused"] == 1
        else:
            assert row["rejected"] == 0 and row["refused"] == 0
    assert "SecAgg+ failed (KeyError" in err and len(rows) == 2


def test_secure_aggregation_on_flowers_simulation_engine_gives_the_simulated_runs_metrics(write_conf, tmp_path):
    """The whole path on Ray: the ClientApp's mod, the nodes' contexts across SecAgg+'s four stages, two actors."""
    conf = write_conf(**SECURE, global_epochs=2, download="compressed")
    assert main.main(["-c", conf, "--out", str(tmp_path / "simulated")]) == 0
    run_command(sys.executable, "main.py", "-c", conf, "--out", tmp_path / "flower", "--engine", "flower",
                "--parallel", "2")
    assert without_seconds(read_csv(tmp_path / "flower" / "metrics.csv")) == \
        without_seconds(read_csv(tmp_path / "simulated" / "metrics.csv"))


def test_a_secagg_plus_run_resumed_on_new_nodes_equals_the_straight_run(flower, make_conf, tmp_path):
    """After a resume the nodes are new (no SecAgg+ state, no model): the server hands each its model back in the
    task, and the protocol starts afresh from its setup stage."""
    conf = make_conf(**{**SECURE, "global_epochs": 3, "download": "compressed"})
    straight = federation.run(conf, str(tmp_path / "straight"), False, grid_of_secagg_nodes(flower))
    out = str(tmp_path / "resumed")
    federation.run({**conf, "global_epochs": 2}, out, False, grid_of_secagg_nodes(flower))
    assert without_seconds(federation.run(conf, out, True, grid_of_secagg_nodes(flower))) == without_seconds(straight)


def test_the_sum_flower_delivers_reads_back_to_the_exact_integer_sums():
    """Flower's own quantization and dequantization (flwr.common.secure_aggregation), run here as SecAgg+ runs them
    with the ranges engines/secagg.py chooses: what the server reads back is exactly the sum of weight times code."""
    import numpy as np
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from engines import secagg
    conf = config.validate({**SECURE, "k": 3, "no_models": 3})
    step, registered = 2.0 ** -13, [37, 500, 211]
    T = secagg.ranges(conf, registered)
    assert T == 2 ** 17  # 127 * 500 = 63500 needs 16 bits: T / 2 = 2^16 holds it
    codes = [np.random.default_rng(c).integers(-127, 128, 1000) for c in range(3)]
    total = np.zeros(1000, dtype=np.int64)
    for weight, code in zip(registered, codes):  # secaggplus_mod: times weight / T, then Flower's quantize
        total += quantize([code * step * (weight / T)], step / 2, T)[0]
    aggregated = dequantize([total], step / 2, T)[0] - (3 - 1) * step / 2  # the workflow's unmask stage
    aggregated *= T / sum(registered)
    expected = sum(weight * code for weight, code in zip(registered, codes))
    assert torch.equal(secagg.sums_from(ndarrays_to_parameters([aggregated]), sum(registered), conf, [1000])[0],
                       torch.from_numpy(expected))
    with pytest.raises(secure.SecureAggregationError, match="T = 131072 .* 2\\^secagg_bits = 2\\^18"):
        secagg.ranges({**conf, "secagg_bits": 18}, registered)  # 3 * 2^17 > 2^18


@pytest.mark.parametrize("overrides, message", [
    ({"error_feedback": True}, "error_feedback"),
    ({"clock": "simulated", "deadline": 10.0}, "a deadline or over-selection"),
    ({"secagg_bits": 40}, "secagg_bits 40"),
])
def test_what_flowers_secagg_plus_cannot_do_is_refused_in_one_line(write_conf, tmp_path, run_main, overrides,
                                                                    message):
    status, _, err = run_main("-c", write_conf(**SECURE, **overrides), "--out", tmp_path / "run", "--engine", "flower")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"secure_aggregation on Flower cannot be combined with {message}" in err, err


@pytest.mark.parametrize("mean, total, message", [
    ([[float("inf")] * 6, [0.0] * 2], 30, "not finite"),  # the masked weights summed to 0: Flower divides by it
    ([[1.5] * 6, [1.5] * 2], 29, "off the fixed-point grid"),  # 1.5 * 29 = 43.5: not the weights it was made with
    ([[200.0] * 6, [1.0] * 2], 30, "passes 3810"),  # 200 * 30 = 6000, where 127 * 30 is the most
    ([[1.5] * 6], 30, "shapes"),  # a tensor short
])
def test_a_sum_no_honest_round_gives_is_refused(mean, total, message):
    """`mean` as Flower delivers it (the sum over the total weight) for nn.Linear(3, 2), steps of 1."""
    import numpy as np
    from flwr.common import ndarrays_to_parameters
    from engines import secagg
    conf = config.validate({**SECURE, "fixed_range": 64.0})
    with pytest.raises(ValueError, match=message):
        secagg.sums_from(ndarrays_to_parameters([np.array(v) for v in mean]), total, conf, [6, 2])


def test_a_masked_vector_of_other_shapes_is_left_out_as_a_dropout(flower, make_conf, tmp_path, capsys):
    """Flower adds masked vectors by numpy broadcasting: an (m, 1) array would make the sum (m, entries). The node that
    sends one is left out of its rounds, SecAgg+ unmasks the others, and the round steps with theirs."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    conf = make_conf(**{**SECURE, "global_epochs": 2, "no_models": 4, "k": 3})
    honest = grid_of_secagg_nodes(flower)

    def reshaped(reply):
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in record:
            record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(data).reshape(-1, 1))
                                             for data in record[Key.MASKED_PARAMETERS]]
        return reply

    def factory(conf, dataset, shares, workspace, store):
        transport = honest(conf, dataset, shares, workspace, store)
        node = transport.grid.behaviours[3]
        transport.grid.behaviours[3] = lambda message: reshaped(node(message))
        return transport
    rows = federation.run(conf, str(tmp_path / "run"), False, factory)
    assert any("3" in row["clients"].split() for row in rows)
    for row in rows:
        assert row["refused"] == 0 and row["rejected"] == int("3" in row["clients"].split())
    assert "rejected client 3's upload: its masked vector is not in the sum" in capsys.readouterr().err


def summed_round(flower, tiny_model, make_conf, results, monkeypatch):
    """One SecAgg+ round of three nodes in which the protocol delivered `results` (node id -> FitRes), or its reason."""
    from engines import secagg
    monkeypatch.setattr(secagg, "run_round", lambda *args: results)
    conf = make_conf(**{**SECURE, "no_models": 3, "k": 3, "aggregation": "mean", "fixed_range": 64.0})
    return one_round(flower, tiny_model, make_conf, {p: garbage for p in range(3)}, **conf)


def fit_result(client_id, value, weight=10, **metrics):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    import numpy as np
    fields = {"client": client_id, "train_loss": 0.5, "checksum": downloads.checksum(
        [torch.arange(1.0, 7.0), torch.tensor([0.5, -0.5])]), **metrics}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(6, value), np.full(2, value)]), weight, fields)


def test_a_round_on_secagg_plus_steps_by_what_the_sum_holds(flower, tiny_model, make_conf, monkeypatch):
    before = tiny_model.weight.detach().clone()
    # Flower delivers the weighted mean: 1.5 from three nodes of weight 10 is the integer sum 45 (steps of 1: range 64
    # at 8 bits), which the mean divides by 30
    results = {1000 + p: fit_result(p, 1.5) for p in range(3)}
    row, server, transport = summed_round(flower, tiny_model, make_conf, results, monkeypatch)
    assert row["rejected"] == 0 and row["refused"] == 0 and row["train_loss"] == 0.5
    assert torch.equal(tiny_model.weight.detach(), before + 1.5)


@pytest.mark.parametrize("results, message", [
    ("SecAgg+ halted: too few nodes answered one of its stages", "SecAgg+ halted"),
    ({1000: fit_result(0, 1.0), 1001: fit_result(1, 1.0, weight=11)}, "claims weight 11, its share allows 1 to 10"),
    ({1000: fit_result(0, 1.0), 1001: fit_result(1, 1.0, checksum="0" * 64)}, "did not hold the server's model"),
    ({1000: fit_result(0, 1.0), 1001: fit_result(1, 1.0, client=2)}, "answers for another client"),
    ({1000: fit_result(0, 1.0), 1001: fit_result(1, 1.0, train_loss="low")}, "train_loss"),
])
def test_a_sum_spoiled_by_one_node_is_not_used_and_the_run_goes_on(flower, tiny_model, make_conf, monkeypatch,
                                                                    capsys, results, message):
    before = tiny_model.weight.detach().clone()
    row, _, _ = summed_round(flower, tiny_model, make_conf, results, monkeypatch)
    assert row["rejected"] == 3 and row["refused"] == 1
    assert torch.equal(tiny_model.weight.detach(), before)
    assert message in capsys.readouterr().err
