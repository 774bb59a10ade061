"""Flower engines: the same clients, codec and server on Flower's simulation engine (Ray actors) and deployment engine
(a SuperLink and SuperNodes), giving the same metrics as the in-process loop.

    python main.py -c ./utils/conf.json --engine flower [--parallel 2 --client-cpus 1 --client-gpus 0]
    python main.py -c ./utils/conf.json --engine deployment --superlink NAME --out DIR   (on the SuperLink's machine)
    deploy/local.sh --nodes 10 -- -c ./utils/conf.json --out runs/deployed   (a SuperLink and 10 SuperNodes, locally)

The ServerApp runs federation.run with a GridTransport: each round it sends each sampled client's node its sync (what
the download method makes it download: the dense model, or a replay, the changed entries or the dense model; the bytes
metrics.csv counts as download) and receives their uploads (codec payloads), sorted by client id. The ClientApp
answers two kinds of message: "query" (which partition, that is which client, this node holds) and "train": it brings
its own copy of the model up to the server's with the sync (downloads.apply_sync), sends a checksum of it, which the
server compares with its own model's, and trains client.Client.local_train on that partition from it.

A node keeps its model (under a relay or compressed download) and what its client keeps (client.KEPT: its
error-feedback residual, its sparsifier's memory) in context.state between rounds. None of it is counted as traffic:
what the client keeps also travels back beside the upload (checked on arrival) into the run's client store
(client_store.py), and the server keeps a copy of the model each node holds (one per round's version, shared), so that
the run folder holds them and --resume continues exactly; after a resume the server hands them back with the client's
next message, as a node that had kept them on disk would find them.
"""
import contextlib
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import clock
import codec
import datasets
import downloads
import engines
import federation
import models
import secure
from client import KEPT, Client, Upload, check_kept, kept_numels
from engines import secagg
from server import Server
from utils import partition, run_files
from utils.run_files import RunError
from utils.seeding import derive_seed

APP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder of pyproject.toml: the Flower app
IF_DROPPED = "residual_if_dropped"  # a reply's residual for the case that the server discards its upload
POLL_SECONDS = 0.02  # how often the server asks for replies (Flower's send_and_receive waits 3 s between asks)


# ---- the ClientApp: one node, one client --------------------------------------------------------------------------

client_app = ClientApp()


@client_app.query()
def query(message: Message, context: Context) -> Message:
    return Message(RecordDict({"node": ConfigRecord({"partition": int(context.node_config["partition-id"])})}),
                   reply_to=message)


@client_app.train(mods=[secagg.mod])
def train(message: Message, context: Context) -> Message:
    summed = secagg.in_protocol(message)  # SecAgg+'s collect stage: the reply is this node's share of the sum
    task = secagg.task(message) if summed else message.content.config_records["task"]
    conf = json.loads(task["conf"])
    torch.set_num_threads(int(task["threads"]))  # the launcher's count: same thread count, same sums, same metrics
    workspace = Workspace.for_conf(conf)
    client_id = int(context.node_config["partition-id"])
    client = Client(client_id, workspace.shares[client_id], conf)
    kept = context.state.config_records
    numels = kept_numels(conf, workspace.shapes)
    for name in KEPT:
        if name in task:  # after a resume the server hands back what this node kept before
            setattr(client, name, workspace.tensors(task[name], numels[name]))
        elif name in kept:
            setattr(client, name, workspace.tensors(kept[name]["values"], numels[name]))
    held = task["model"] if "model" in task else kept["model"]["values"] if "model" in kept else None
    replica = workspace.replica(conf, held)
    downloads.apply_sync(task["sync"], replica, int(task["round"]) - 1)
    synced = replica.flat_globals()
    if conf["download"] != "dense":  # the next sync starts from this model
        kept["model"] = ConfigRecord({"values": codec.encode(codec.DENSE_F32, synced, 0).payload})
    upload = client.local_train(workspace.model, replica.global_state(), workspace.dataset, int(task["round"]))
    reply = {"client": client_id, "train_loss": upload.train_loss, "checksum": downloads.checksum(synced)}
    if summed:  # nothing of it kept (error feedback is refused here): a residual would show the server the upload
        return secagg.reply(message, upload, secure.weight(conf, len(client.indices)), conf, workspace.numels,
                            int(task["round"]), reply)
    reply["payload"] = upload.payload
    for name in KEPT:
        if getattr(client, name) is not None:
            reply[name] = codec.encode(codec.DENSE_F32, getattr(client, name), 0).payload
            kept[name] = ConfigRecord({"values": reply[name]})
    if client.residual_if_dropped is not None:  # the server keeps it, and hands it back if it discards this upload
        reply[IF_DROPPED] = codec.encode(codec.DENSE_F32, client.residual_if_dropped, 0).payload
    return Message(RecordDict({"upload": ConfigRecord(reply)}), reply_to=message)


class Workspace:
    """What a process that trains clients holds once, whichever client it trains: the data and its partition, and
    one model. A Ray actor keeps it for every message it handles; a node's ClientApp process builds it per message."""
    current = None

    def __init__(self, conf):
        self.key = {key: conf[key] for key in WORKSPACE_KEYS}
        self.device = federation.pick_device(conf["device"])
        self.dataset = datasets.load(conf["type"], conf["data_dir"], self.device)
        _, self.shares = partition.server_and_clients(self.dataset, conf)
        torch.manual_seed(derive_seed(conf["seed"], "init"))  # as the server draws its model: the same buffers
        self.model = models.for_data(conf["model_name"], self.dataset, conf["pretrained"]).to(self.device)
        self.template = {name: value.clone() for name, value in self.model.state_dict().items()}
        self.shapes = [v.shape for v in self.template.values() if torch.is_floating_point(v)]
        self.numels = [v.numel() for v in self.template.values() if torch.is_floating_point(v)]
        self.replica_model = copy.deepcopy(self.model)  # the node's own copy of the global model

    @classmethod
    def for_conf(cls, conf):
        if cls.current is None or cls.current.key != {key: conf[key] for key in WORKSPACE_KEYS}:
            cls.current = cls(conf)
        return cls.current

    def tensors(self, payload, numels):
        """Flat float tensors on this device from a dense codec payload of tensors of `numels` entries."""
        return [values.to(self.device) for values in codec.decode(payload, numels, codec.DENSE_F32)[2]]

    def replica(self, conf, held):
        """A Server around this node's model: `held` (a dense payload) if it keeps one, else the initial model, which
        the seed determines, as the server's (integer buffers, which never travel, stay as the model was built)."""
        self.replica_model.load_state_dict(self.template)
        replica = Server(self.replica_model, conf, self.device)
        if held is not None:
            replica.overwrite([None] * len(self.numels), self.tensors(held, self.numels))
        return replica


WORKSPACE_KEYS = ("type", "data_dir", "device", "no_models", "partition", "alpha", "shards_per_client", "seed",
                  "server_validation", "model_name", "pretrained")


# ---- the ServerApp: federation.run over a grid ------------------------------------------------------------------

class GridTransport:
    """Trains the sampled clients on their Flower nodes: one message each, replies gathered by client id."""

    def __init__(self, grid, conf, shapes, settings, stop, store, registered):
        self.grid, self.conf, self.store = grid, conf, store
        self.registered = registered  # per client, the examples of its share: the most weight its node may claim
        self.numels = [math.prod(shape) for shape in shapes]
        self.secure_sum = None  # under secure aggregation, the round's sums as Flower's SecAgg+ delivered them
        if conflict := engines.check_secure_aggregation(conf):  # main.py checks it before Ray starts; from Python, here
            raise RunError(conflict)
        self.quantization_range = secagg.ranges(conf, registered) if conf["secure_aggregation"] else None
        self.timeout, self.client_threads, self.stop = settings["timeout"], settings["threads"], stop
        self.node_of = self._find_nodes()
        self.kept_numels = kept_numels(conf, shapes)
        self.models = {}  # client id -> the model its node holds, a dense payload (one object per round, shared)
        self.to_restore = {}  # client id -> what to hand back after a resume with its next message
        self.resumed = set()  # after a resume: the clients whose kept state (in the store) is not yet handed back
        self.if_dropped = {}  # client id -> the residual it keeps if the server discards its last upload

    def _find_nodes(self):
        """Map each client (partition id) to its node, asking every node once which partition it holds."""
        wanted, deadline = self.conf["no_models"], time.monotonic() + self.timeout
        nodes = []
        while len(nodes) < wanted:
            nodes = list(self.grid.get_node_ids())
            self._check_time(deadline, f"{len(nodes)} of {wanted} nodes connected")
            time.sleep(POLL_SECONDS)
        replies = self._exchange([self._message(node, "query", {}) for node in nodes], deadline)
        node_of = {}
        for reply in replies:
            if reply is not None and not reply.has_error():
                node_of[int(reply.content.config_records["node"]["partition"])] = reply.metadata.src_node_id
        missing = sorted(set(range(wanted)) - set(node_of))
        if missing:
            raise RunError(f"no node holds partition-id {missing[0]} (of {wanted} clients, no_models); start one node "
                           f"per client with --node-config 'partition-id=ID num-partitions={wanted}'")
        return node_of

    def train(self, chosen, syncs, global_state, round_index, progress=None):
        floats = [t.flatten() for t in global_state.values() if torch.is_floating_point(t)]
        expected = downloads.checksum(floats)  # what every node's model must be after its sync
        held = codec.encode(codec.DENSE_F32, floats, 0).payload if self.conf["download"] != "dense" else None
        task = {"round": round_index, "conf": json.dumps(self.conf), "threads": self.client_threads}
        contents = {}  # client id -> its train task, in the order of `chosen`
        for client_id in chosen:
            if client_id in self.resumed:
                self.resumed.discard(client_id)
                for name in self.store.numels:
                    kept = self.store.get(name, client_id)
                    if kept is not None:
                        self.to_restore.setdefault(client_id, {})[name] = codec.encode(codec.DENSE_F32, kept, 0).payload
            contents[client_id] = {**task, "sync": syncs[client_id], **self.to_restore.pop(client_id, {})}
        if self.conf["secure_aggregation"]:
            uploads = self._train_summed(contents, round_index, expected)
        else:
            messages = [self._message(self.node_of[c], "train", content) for c, content in contents.items()]
            replies = self._exchange(messages, time.monotonic() + self.timeout)
            uploads = [self._upload(client_id, reply, expected) for client_id, reply in zip(chosen, replies)]
        for upload in uploads:
            if held is not None and upload.problem is None:
                self.models[upload.client_id] = held
        return uploads

    def _train_summed(self, contents, round_index, expected_checksum):
        """The round on Flower's SecAgg+ (engines/secagg.py): the sampled clients' Uploads, without payloads, and the
        sum of theirs in self.secure_sum. A node in the sum whose reply is malformed, claims more weight than its
        share has, or whose model after its sync is not the server's, spoils the sum (which cannot be taken apart):
        then nothing of the round is used."""
        self.secure_sum = None
        client_of = {self.node_of[client_id]: client_id for client_id in contents}
        entries = secure.movable_counts(self.conf, round_index, self.numels)
        exchange = secagg.Exchange(self._exchange, self.timeout, entries, 2 ** self.conf["secagg_bits"])
        outcome = secagg.run_round(exchange, {self.node_of[c]: content for c, content in contents.items()},
                                   round_index, self.conf, self.quantization_range)
        problem = outcome if isinstance(outcome, str) else None
        results = {} if problem else {client_of[node]: result for node, result in outcome.items() if node in client_of}
        for client_id, result in sorted(results.items()):
            try:
                self._check_reply(client_id, result.metrics)
            except (KeyError, TypeError, ValueError) as e:
                problem = f"client {client_id}'s node in the sum replied malformed ({e})"
            else:
                most = secure.weight(self.conf, self.registered[client_id])
                if type(result.num_examples) is not int or not 1 <= result.num_examples <= most:
                    problem = f"client {client_id}'s node in the sum claims weight {result.num_examples!r}, its " \
                              f"share allows 1 to {most}"
                elif result.metrics["checksum"] != expected_checksum:
                    problem = f"client {client_id}'s node in the sum did not hold the server's model after its sync"
            if problem:
                break
        if problem or not results:
            problem = problem or "no node's masked vector is in the sum"
            return [Upload(c, b"", float("nan"), problem=problem) for c in contents]
        total = sum(result.num_examples for result in results.values())
        try:
            codes = secagg.sums_from(next(iter(results.values())).parameters, total, self.conf, entries)
        except ValueError as e:
            return [Upload(c, b"", float("nan"), problem=f"SecAgg+ delivered a sum no honest round gives: {e}")
                    for c in contents]
        self.secure_sum = secure.delivered(codes, total, self.conf, round_index, self.numels)
        return [Upload(c, b"", results[c].metrics["train_loss"]) if c in results else
                Upload(c, b"", float("nan"), problem="its masked vector is not in the sum") for c in contents]

    def _upload(self, client_id, reply, expected_checksum):
        """The client's Upload, or one that carries why nothing usable came back. Every field is checked here, as it
        arrives: a bad one found later (a residual, at the checkpoint) would end the run."""
        if reply is None:
            return Upload(client_id, b"", float("nan"), problem=f"no reply within {self.timeout:g} s")
        if reply.has_error():
            return Upload(client_id, b"", float("nan"), problem=f"the node failed ({reply.error.reason})")
        try:
            record = reply.content.config_records["upload"]
            self._check_reply(client_id, record)
        except (KeyError, TypeError, ValueError) as e:
            return Upload(client_id, b"", float("nan"), problem=f"the node's reply is malformed ({e})")
        if record["checksum"] != expected_checksum:
            return Upload(client_id, b"", float("nan"), problem="the node's model after its sync is not the server's "
                          f"(checksum {record['checksum'][:16]}..., expected {expected_checksum[:16]}...)")
        for name, numels in self.kept_numels.items():
            if name in record:
                self.store.put(name, client_id, codec.decode(record[name], numels, codec.DENSE_F32)[2])
        if IF_DROPPED in record:
            self.if_dropped[client_id] = record[IF_DROPPED]
        # the payload's bytes are the server's to decode: it rejects a garbled one, and the round counts its bytes
        return Upload(client_id, record["payload"], record["train_loss"])

    def _check_reply(self, client_id, record):
        """Raise ValueError naming the first field of a train reply that is not what train() sends."""
        if type(record["client"]) is not int or record["client"] != client_id:
            raise ValueError(f"it answers for another client, {record['client']!r}")
        if not self.conf["secure_aggregation"] and not isinstance(record["payload"], bytes):  # none under SecAgg+
            raise ValueError("its payload is not bytes")
        if not isinstance(record["checksum"], str):
            raise ValueError("its checksum is not text")
        # NaN is what a diverging client reports in process too: the server then rejects its upload
        if not isinstance(record["train_loss"], float):
            raise ValueError(f"its train_loss {record['train_loss']!r} is not a number")
        for name, numels in self.kept_numels.items():
            self._check_kept(record, name, numels)
        droppable = clock.may_drop(self.conf) and self.kept_numels["residual"] is not None
        self._check_kept(record, IF_DROPPED, self.kept_numels["residual"] if droppable else None)

    def _check_kept(self, record, name, numels):
        """Raise ValueError when the reply's `name` (client.KEPT, or IF_DROPPED) is not the dense, finite tensors of
        `numels` entries that its client keeps, or is there when it keeps none (numels None)."""
        expected = numels is not None
        if (name in record) != expected:
            why = {"residual": f"error feedback is {'on' if expected else 'off'}",
                   "memory": f"the {self.conf['sparsifier']} sparsifier keeps {'one' if expected else 'none'}",
                   IF_DROPPED: "error feedback under a deadline or over-selection keeps one" if expected else
                   "no upload of this run can be discarded with error feedback"}[name]
            raise ValueError(f"its {name} is {'missing' if expected else 'unexpected'}: {why}")
        if not expected:
            return
        if not isinstance(record[name], bytes):
            raise ValueError(f"its {name} is not bytes")
        try:
            values = codec.decode(record[name], numels, codec.DENSE_F32)[2]
        except codec.PayloadError as e:
            raise ValueError(f"its {name} is not a dense payload for this model ({e})") from None
        check_kept(f"its {name}", values, numels)

    def drop(self, dropped):
        """The server discarded the uploads of `dropped`: each keeps the residual its node sent for that case, which
        the node is handed back with its next message."""
        for client_id in dropped:
            if client_id in self.if_dropped:
                residual = self.if_dropped[client_id]
                self.store.put("residual", client_id,
                               codec.decode(residual, self.kept_numels["residual"], codec.DENSE_F32)[2])
                self.to_restore.setdefault(client_id, {})["residual"] = residual
        self.if_dropped = {}

    def client_state(self):
        return {"models": {str(c): payload for c, payload in self.models.items()}}

    def restore_client_state(self, state):
        self.resumed = set(range(self.conf["no_models"]))
        for client_id, payload in state["models"].items():
            self.models[int(client_id)] = bytes(payload)
            self.to_restore.setdefault(int(client_id), {})["model"] = self.models[int(client_id)]

    def _message(self, node_id, kind, content):
        return Message(RecordDict({"task": ConfigRecord(content)}), dst_node_id=node_id, message_type=kind)

    def _exchange(self, messages, deadline):
        """Send `messages`; gather their replies until all came or the deadline. Returns the replies in the order of
        the messages (None where none came); replies arrive in any order, and summing them in that order would change
        the last bits of the aggregate."""
        ids = list(self.grid.push_messages(messages))
        replies, waiting = {}, set(ids)
        while waiting and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(waiting):  # only ids still waiting: pulled ones are gone from the link
                replies[reply.metadata.reply_to_message_id] = reply
            waiting -= set(replies)
            if waiting:
                if self.stop.is_set():
                    raise KeyboardInterrupt
                time.sleep(POLL_SECONDS)
        return [replies.get(message_id) for message_id in ids]

    def _check_time(self, deadline, what):
        if self.stop.is_set():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            raise RunError(f"Flower: only {what} after {self.timeout:g} s")


def serve(grid, settings, stop):
    """The ServerApp's work: federation.run with this grid as the transport; returns the metrics rows."""
    def transport(conf, dataset, shares, workspace, store):
        shapes = [t.shape for t in workspace.state_dict().values() if torch.is_floating_point(t)]
        return GridTransport(grid, conf, shapes, settings, stop, store, [len(share) for share in shares])
    return federation.run(settings["conf"], settings["out"], settings["resume"], transport)


server_app = ServerApp()


@server_app.main()
def deployed(grid: Grid, context: Context) -> None:
    """The deployment engine's entry point: its settings come in the run config (deploy/local.sh writes them)."""
    settings = json.loads(context.run_config["settings"])
    torch.set_num_threads(settings["threads"])  # this process evaluates the model: the launcher's thread count
    serve(grid, settings, threading.Event())


# ---- the simulation engine ---------------------------------------------------------------------------------------

def simulate(conf, out, resume, parallel=1, client_cpus=None, client_gpus=0.0, timeout=600.0):
    """Run `conf` into `out` on Flower's simulation engine: one virtual node per client, `parallel` Ray actors, each
    training with `client_cpus` torch threads (default: this process's threads shared among them) on `client_gpus`
    GPUs. Returns the metrics rows."""
    from flwr.simulation import run_simulation  # Ray loads only here
    import logging
    # Flower's log would bury the one line per round; the transport reports a node's failure in one line itself
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    # each actor trains with as many threads as it has CPUs; with the in-process engine's count, the sums match its
    # bit for bit
    settings = {"conf": conf, "out": out, "resume": resume, "timeout": timeout,
                "threads": engines.client_threads(parallel, client_cpus)}
    stop, result = threading.Event(), {}
    app = ServerApp()

    @app.main()
    def main(grid, context):
        try:
            result["rows"] = serve(grid, settings, stop)
        except KeyboardInterrupt:  # the stop asked for below; the main thread reports it
            pass
    # Flower makes as many actors as fit the node's CPUs, int(node CPUs / CPUs per actor), and Ray wants a whole
    # number for the node: with 0.5 CPUs per actor that would be two actors where one was asked for. So Ray's CPUs
    # here count actors (one each, `parallel` on the node); an actor's cores are its torch threads. GPUs are Ray's to
    # share out (which actors see which GPU), so an actor asks for its fraction of one.
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": client_gpus}}
    start_ray(num_cpus=parallel, num_gpus=engines.node_gpus(client_gpus, parallel))
    try:
        with signals_as(stop) as caught:
            run_simulation(app, client_app, num_supernodes=conf["no_models"], backend_config=backend)
    finally:
        import ray
        ray.shutdown()
    if caught:  # delivered now, to the handlers main.py set, which report the stop and the command that continues
        signal.raise_signal(caught[0])
    return result.get("rows", [])


@contextlib.contextmanager
def signals_as(stop):
    """Turn a first SIGINT or SIGTERM into `stop` (the ServerApp's thread then ends at its next wait for replies,
    after the round it saved, and Flower winds its workers down before it shuts Ray down); yield the signals caught.
    Raising in this thread instead would make Flower shut Ray down under a worker still waiting for an actor, and the
    process would hang at exit. A second signal stops at once."""
    caught = []

    def hold(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        stop.set()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield caught
        return
    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def start_ray(**resources):
    """Start Ray as Flower's backend would (which then uses it), but keep this process's SIGINT and SIGTERM handlers:
    Ray's would end the process at once, before the finished rounds are reported and the run can be continued."""
    # Ray binds its daemons, agents and workers to the node's address (on Linux the machine's external one) and their
    # gRPC servers to every interface, unless it is told this is not a cluster: then all of them bind to 127.0.0.1.
    # This Ray serves only this process's actors, and it has no authentication: nothing of it may face the network.
    # Ray reads the variable when it is first imported, which is here.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    pythonpath = os.pathsep.join(sys.path)  # so that actors import this app's modules, as Flower arranges it
    with warnings.catch_warnings():  # a notice about a future default for GPU-less actors, nothing to act on
        warnings.simplefilter("ignore", FutureWarning)
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False, **resources)
    if threading.current_thread() is threading.main_thread():
        for s, handler in handlers.items():
            signal.signal(s, handler)


# ---- the deployment engine, launched from the SuperLink's machine ---------------------------------------------------

OUR_LINES = re.compile(r"^(data:|round |resuming |note:)")  # what federation.run prints; the rest is Flower's log


def deploy(conf, out, resume, superlink, timeout=600.0):
    """Run `conf` into `out` on a deployment: `flwr run` hands this folder's Flower app to the SuperLink that the
    connection `superlink` of $FLWR_HOME/config.toml names, and this follows the run's log until it ends. The ServerApp
    writes the run folder on the SuperLink's machine, so run this there. Returns the metrics rows."""
    settings = {"conf": conf, "out": os.path.abspath(out), "resume": resume, "timeout": timeout,
                "threads": torch.get_num_threads()}
    flwr = os.path.join(os.path.dirname(sys.executable), "flwr")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    with tempfile.TemporaryDirectory() as scratch:
        run_config = os.path.join(scratch, "run.toml")
        with open(run_config, "w") as f:
            f.write(f"settings = {json.dumps(json.dumps(settings))}\n")  # a TOML string holding JSON
        process = subprocess.Popen([flwr, "run", APP_DIR, superlink, "--run-config", run_config, "--stream"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        run_id, log = None, []
        try:
            for line in process.stdout:
                log.append(line)
                run_id = run_id or next(iter(re.findall(r"Successfully started run (\d+)", line)), None)
                if OUR_LINES.match(line):
                    print(line, end="", flush=True)
            process.wait()
        except KeyboardInterrupt:  # stop the run on the SuperLink too; the rounds it saved stay
            if run_id:
                subprocess.run([flwr, "stop", run_id, superlink], capture_output=True, env=env, timeout=60)
            process.terminate()
            raise
    if run_id is None:
        raise RunError(f"flwr run could not start the app on SuperLink '{superlink}': "
                       f"{' '.join(''.join(log[-3:]).split())[:300]}")
    listing = subprocess.run([flwr, "ls", superlink, "--run-id", run_id, "--format", "json"], capture_output=True,
                             text=True, env=env, timeout=60)
    try:
        status = json.loads(listing.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        raise RunError(f"cannot learn how Flower run {run_id} ended: flwr ls answered "
                       f"{' '.join((listing.stdout + listing.stderr).split())[:200]!r}") from None
    if status["status"] != "finished:completed":
        raise RunError(f"the Flower run {run_id} ended {status['status']}: {status['status-details']}")
    compute = status.get("compute-time", {})
    print(f"flower: run {run_id} took {status.get('elapsed', 0):.0f} s on the SuperLink; its ClientApp processes "
          f"ran {compute.get('clientapp-seconds', 0):.0f} s in all")
    return run_files.read_metrics(out)
