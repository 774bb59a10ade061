"""The round loop, whatever carries the clients' uploads: an engine's transport (engines/).

    rows = federation.run(conf, out, resume, transport_factory)    (docs/python.md: from a notebook)

Each round (`play_round`): sample k clients (`sample_clients`, the one sampling rule), synchronize each with the global
model (what it downloads: downloads.py), ask the transport to train them and hand back their uploads, decode the
uploads into the server's sums, aggregate (which moves the model by what the download method broadcasts), evaluate,
and save the round to the run folder.
"""
import contextlib
import copy
import dataclasses
import math
import sys
import time

import torch

import clock
import codec
import datasets
import fedbuff
import models
import privacy
import secure
from client import check_kept, kept_numels, local_steps
from client_store import ClientStore, StoreError
from server import Server
from utils import partition, run_files
from utils.run_files import RunError
from utils.seeding import derive_seed, generator

CLEAR_LINE = "\r\033[K"  # carriage return + erase line: replaces the progress line on a terminal
# a validation loss above this many times a uniform guess's (ln classes) gives the true class e^-23 (1e-10) on average
# for 10 classes: only a blown-up step does that. The highest test loss of any honest run in the results is 2.57
# (a guess's 2.30); one client's noise of 100 times its update's std took a CNN to 218 and left it dead (accuracy 0.10
# from then on) under the 100 times this bound was before
BLOWN_UP = 10


def sample_clients(conf, round_index, online=None, count=None):
    """The sorted ids of the `count` (k unless told) clients that train in round `round_index`, drawn among the ids
    `online` (every client when None); seeded, independent of earlier rounds."""
    if privacy.enabled(conf):  # Poisson sampling, as the accountant assumes (config refuses what would change it)
        return privacy.sample(conf, round_index)
    pool = conf["no_models"] if online is None else len(online)
    chosen = torch.randperm(pool, generator=generator(conf["seed"], "sample", round_index))[:count or conf["k"]]
    return sorted((chosen if online is None else online[chosen.numpy()]).tolist())


def run(conf, out, resume, transport_factory):
    """Train `conf` into folder `out` (continuing it when `resume`); returns the metrics rows.

    transport_factory(conf, dataset, shares, model, store) builds the engine's transport: the object that trains the
    sampled clients and returns their uploads (engines/inprocess.py is the default)."""
    device = pick_device(conf["device"])
    privacy.check(conf)  # main.py checks it before a sweep's first run; a caller from Python meets it here
    dataset = datasets.load(conf["type"], conf["data_dir"], device)
    validation, shares = partition.server_and_clients(dataset, conf)
    print(f"data: {conf['type']} from {dataset.source}, {len(dataset.train_labels)} train ({len(validation)} held by "
          f"the server for validation) / {len(dataset.test_labels)} test; partition {conf['partition']}: "
          f"{partition.summary(shares, dataset.train_labels)}")
    if conf["error_feedback"] and conf["sparsifier"] == "random" and conf["mask"] == "fixed":
        print("note: with a fixed random mask, error feedback never sends what the mask leaves out (only quantization "
              "error is fed back); set mask to 'round' to send it", file=sys.stderr)
    registered = [len(share) for share in shares]  # the examples each client enrolled with
    if conf["secure_aggregation"]:
        secure.check_headroom(conf, registered)
    torch.manual_seed(derive_seed(conf["seed"], "init"))
    server = Server(models.for_data(conf["model_name"], dataset, conf["pretrained"]),
                    conf, device, registered=registered,
                    validation=dataset.train_split(validation) if len(validation) else None)
    privacy.check_rounding(conf, server.numels)
    # the clients' state: opened (and, unless resumed, emptied) at its first write, so after the check below
    store = ClientStore(out, kept_numels(conf, [t.shape for t in server.globals]), conf["client_state_memory"],
                        resume)
    # before the run folder is made: a transport that refuses the run (in process, a model whose clients cannot
    # train at once) leaves no folder behind
    transport = transport_factory(conf, dataset, shares, copy.deepcopy(server.model), store)
    with run_files.locked(out), contextlib.closing(store):
        if not resume and run_files.holds_run(out):  # another run finished here since the command line was checked
            raise RunError(f"{out} already holds a run: continue it with --resume, or choose another --out")
        timer = clock.Clock(conf, [local_steps(len(share), conf) for share in shares]) if conf["clock"] != "none" \
            else None
        buffered = fedbuff.FedBuff(conf, server, transport, timer, sample_clients) if conf["mode"] == "async" else None
        rows = []
        if resume:
            rows = restore(out, conf, server, transport, store, device, dataset.digest, timer, buffered)
            run_files.write_metrics(out, rows)  # the checkpoint's rows: a kill -9 may have cut metrics.csv short
        run_files.write_config(out, conf)
        run_files.write_environment(out, device, len(rows) + 1, getattr(transport, "client_threads", None))
        show_progress = sys.stdout.isatty()
        for round_index in range(len(rows) + 1, conf["global_epochs"] + 1):
            rows.append(play_step(round_index, server, buffered, dataset) if buffered else
                        play_round(round_index, conf, server, transport, dataset, timer, show_progress))
            if timer and not buffered:
                rows[-1]["sim_seconds"] = clock.elapsed(rows[-2]["sim_seconds"] if len(rows) > 1 else 0.0,
                                                        rows[-1]["round_seconds"])
            with run_files.signals_held():  # a stop during the save waits for the round's line, so it is shown
                save(out, conf, server, transport, store, rows, dataset.digest, timer, buffered)
                print_row(rows[-1], conf["global_epochs"], show_progress)
    return rows


def play_round(round_index, conf, server, transport, dataset, timer=None, show_progress=False):
    """One round: sample, synchronize, train, time it on the simulated clock (`timer`: which uploads arrive in time),
    receive, aggregate (and roll back a round after which the loss on the server's validation split blew up),
    evaluate on the test split; returns its metrics row. The test split is only scored: nothing that changes the
    model reads it."""
    started = time.perf_counter()
    chosen = sample_clients(conf, round_index, timer.online(round_index), timer.sampled()) if timer else \
        sample_clients(conf, round_index)
    if not chosen:
        print(f"round {round_index}: no client was " + ("sampled" if privacy.enabled(conf) else "online"),
              file=sys.stderr)
    syncs = {client_id: server.sync(client_id) for client_id in chosen}  # (the bytes it downloads, their kind)
    progress = progress_printer(round_index) if show_progress else None
    uploads = transport.train(chosen, {c: sync for c, (sync, _) in syncs.items()}, server.global_state(), round_index,
                              progress)
    timed = [upload for upload in uploads if upload.problem is None]  # a failed node's upload never arrives
    masked = secure.masked_upload_size(conf, round_index, server.numels) if conf["secure_aggregation"] else None
    timings, round_seconds = timer.play(round_index, [(upload.client_id, len(syncs[upload.client_id][0]),
                                                       masked or len(upload.payload)) for upload in timed]) \
        if timer else ([], 0)
    late = [timing for timing in timings if not timing.arrived]
    dropped = {timing.client for timing in late}
    if clock.may_drop(conf):
        transport.drop(dropped)
    if timings and len(dropped) == len(timings):
        print(f"round {round_index}: no upload arrived in time: the deadline is {conf['deadline']:g} s, the fastest "
              f"client needed {min(t.finish_s for t in timings):.4g} s", file=sys.stderr)
    arrived = [upload for upload in uploads if upload.client_id not in dropped]
    if conf["secure_aggregation"]:
        arrived = secure.at_least_two(arrived)
    received = receive(round_index, server, arrived, masked=masked, delivered=transport.secure_sum)
    accuracy, loss, kept = step_and_evaluate(round_index, server, dataset)
    kept_clients = [client_id for client_id in chosen if client_id not in dropped]
    row = metrics_row(round_index, server, received, kept_clients, [syncs[c] for c in kept_clients],
                      [kind for _, kind in syncs.values()], accuracy, loss, kept, started)
    if privacy.enabled(conf):  # every round played counts, a rolled-back one too: its noised sum was released
        row["epsilon"] = round(privacy.epsilon(conf, round_index), 6)
    if conf["secure_aggregation"]:
        up, down = secure.protocol_bytes(len(chosen), len(kept_clients))
        row.update({"secagg_up_bytes": up, "secagg_down_bytes": down, "secagg_overflows": server.overflows,
                    "total_bytes": row["total_bytes"] + up + down})
    if timer:
        row.update({"round_seconds": round(round_seconds, 6), "dropped": len(late),
                    "dropped_download_bytes": sum(timing.download_bytes for timing in late),
                    "dropped_upload_bytes": sum(timing.upload_bytes for timing in late),
                    "timings": [timing.row() for timing in timings]})
    return row


def play_step(step_index, server, buffered, dataset):
    """One server step of FedBuff (fedbuff.py): the next `buffer_size` uploads to arrive on the simulated clock, each
    weighted by its staleness, are received, aggregated and evaluated as a round's are; returns its metrics row."""
    started, before = time.perf_counter(), buffered.now
    buffer, failed, syncs = buffered.take_buffer(step_index)
    received = receive(step_index, server, [flight.upload for flight in buffer + failed], buffered.weights(buffer))
    accuracy, loss, kept = step_and_evaluate(step_index, server, dataset)
    row = metrics_row(step_index, server, received, [flight.upload.client_id for flight in buffer], syncs,
                      [kind for _, kind in syncs], accuracy, loss, kept, started)
    row.update(buffered.stepped(buffer, before))
    return row


@dataclasses.dataclass
class Received:
    """What a round's uploads brought: their bytes, how many were rejected, their clients' training losses, and the
    diff entries the accepted ones carried."""
    upload_bytes: int
    rejected: int
    losses: list
    entries: int


def receive(round_index, server, uploads, weights=None, masked=None, delivered=None):
    """Decode `uploads` into the server's sums (each scaled by its weight in `weights`, by client id: a stale upload's
    under FedBuff); print why any was rejected. Under secure aggregation an accepted upload travels as its masked
    vector, of `masked` bytes; when the transport ran the protocol itself, `delivered` is the round's sums it handed
    over (secure.delivered), and the uploads in it carry no payload."""
    upload_bytes, rejected = 0, 0
    arrived = [upload for upload in uploads if upload.problem is None]
    if delivered is not None:
        server.receive_sum(delivered, len(arrived), round_index)
        upload_bytes += masked * len(arrived)
    for upload in uploads:
        if delivered is not None and upload.problem is None:
            continue
        weight = weights.get(upload.client_id, 1.0) if weights else 1.0
        problem = upload.problem or server.receive(upload.payload, upload.client_id, weight)
        if upload.problem:  # nothing usable came back: what the client's model is now, the server cannot tell
            server.syncs.forget(upload.client_id)
        if problem:
            rejected += 1
            print(f"round {round_index}: rejected client {upload.client_id}'s upload: {problem}", file=sys.stderr)
        upload_bytes += masked if masked and not problem else len(upload.payload)
    return Received(upload_bytes, rejected, [upload.train_loss for upload in arrived], server.received_entries)


def step_and_evaluate(round_index, server, dataset):
    """Aggregate what was received (and roll the step back if the loss on the server's validation split blew up),
    then score the model on the test split; returns (accuracy, loss, why the model stayed as it was or None)."""
    kept = server.aggregate(round_index)
    if kept:
        print(f"round {round_index}: the global model stays as it was: {kept}", file=sys.stderr)
    elif server.validation is not None:  # finite uploads can blow the model up: one of 1e30 per entry
        kept = blown_up(server.evaluate(*server.validation)[1], dataset.num_classes)
        if kept:
            server.roll_back()
            print(f"round {round_index}: rolled back: {kept}", file=sys.stderr)
    accuracy, loss = server.evaluate(dataset.test_inputs, dataset.test_labels)
    return accuracy, loss, kept


def metrics_row(round_index, server, received, clients, downloads, kinds, accuracy, loss, kept, started):
    """A round's metrics row: `clients` are those whose uploads arrived, `downloads` the (bytes, kind) syncs counted as
    downloaded, `kinds` the kinds of every sync made."""
    download_bytes = sum(len(sync) for sync, _ in downloads)
    losses = received.losses
    return {
        "round": round_index, "accuracy": round(accuracy, 6), "loss": round(loss, 6),
        "train_loss": round(sum(losses) / len(losses), 6) if losses else float("nan"),
        "upload_bytes": received.upload_bytes,
        "dense_upload_bytes": codec.dense_size(server.numels) * len(clients), "download_bytes": download_bytes,
        "total_bytes": received.upload_bytes + download_bytes,
        "upload_fraction": round(received.entries / (sum(server.numels) * max(len(clients), 1)), 6),
        "syncs_replay": kinds.count("replay"), "syncs_changed": kinds.count("changed"),
        "syncs_dense": kinds.count("dense"),
        "clients": " ".join(map(str, clients)), "rejected": received.rejected,
        "refused": int(kept is not None), "seconds": round(time.perf_counter() - started, 3),
    }


def blown_up(loss, num_classes):
    """Why a round's validation loss says the model blew up (not finite, or over BLOWN_UP times a uniform guess's), or
    None."""
    guess = math.log(num_classes)
    if not math.isfinite(loss):
        return "the validation loss after it was not finite"
    if loss > BLOWN_UP * guess:
        return f"the validation loss after it was {loss:.4g}, over {BLOWN_UP} times a uniform guess's ({guess:.2f})"
    return None


def pick_device(asked):
    if asked == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' was asked for, but CUDA is not available here")
    return torch.device("cuda" if asked != "cpu" and torch.cuda.is_available() else "cpu")


def save(out, conf, server, transport, store, rows, data_digest, timer=None, buffered=None):
    """The round to the run folder: the clients' changed records to their store, then the checkpoint naming them."""
    table = store.flush()
    run_files.save(out, {
        "data": data_digest,
        "profile": timer.source if timer else None,
        "async": buffered.state() if buffered else None,
        "config": conf,
        "rows": rows,
        "model": server.model.state_dict(),
        "velocity": server.velocity,
        "download": server.download.state(),
        "syncs": server.syncs.state(),
        "clients": transport.client_state(),
        "store": table,
    })
    store.committed(table)


def restore(out, conf, server, transport, store, device, data_digest, timer=None, buffered=None):
    """The saved rows; the server's model, momentum, download state and the clients' state are put back as they
    were. Whatever is restored is checked first: a digest of the file (and of each client's record in the store),
    then every tensor's size and finiteness (a NaN saved by a bug, or patched in with a digest made anew, would
    otherwise spoil every later round)."""
    try:
        state = run_files.load_checkpoint(out, device)
    except Exception as e:  # torch.load raises many kinds for a damaged file
        raise RunError(f"cannot resume {out}: checkpoint.pt is damaged or not a fedsparse checkpoint "
                       f"({first_line(e)})") from None
    try:
        differing = [key for key, value in state.get("config", conf).items()
                     if key not in ("global_epochs", "client_state_memory") and conf.get(key) != value]
        if differing:
            key = differing[0]
            raise ValueError(f"its {key} is {state['config'][key]!r}, config.json says {conf.get(key)!r}")
        if state.get("data", data_digest) != data_digest:  # checkpoints from before the digest have none
            raise RunError(f"cannot resume {out}: its data ({conf['type']}) changed since the run started: its "
                           f"examples, labels or clients are not the ones its rounds were played on")
        if timer and state["profile"] != timer.source:
            raise RunError(f"cannot resume {out}: its profile {conf['profile']} changed since the run started (its "
                           f"clients' links and speeds would not be the ones its rounds were timed with)")
        if "store" not in state:
            raise RunError(f"cannot resume {out}: its checkpoint.pt was written before clients' state moved to the "
                           f"client store (clients/); finish it with the fedsparse that started it")
        server.model.load_state_dict(state["model"])
        check_kept("its global model", server.flat_globals(), server.numels)
        if state["velocity"] is not None:
            check_kept("its server momentum", state["velocity"], server.numels)
        server.velocity = state["velocity"]
        server.download.restore(state["download"])
        server.syncs.restore(state["syncs"], server.download.method)
        clients = state["clients"]
        strangers = [c for c in clients["models"] if not 0 <= int(c) < conf["no_models"]]
        strangers += [c for records in state["store"]["records"].values() for c in records
                      if type(c) is not int or not 0 <= c < conf["no_models"]]
        strangers += [c for c in server.syncs.synced if not 0 <= c < conf["no_models"]]
        if strangers:
            raise ValueError(f"it holds the state of client {strangers[0]}, this run has {conf['no_models']} clients")
        store.restore(state["store"])
        for client_id, payload in clients["models"].items():
            check_kept(f"the model of client {client_id}'s node", codec.decode(payload, server.numels,
                                                                               codec.DENSE_F32)[2], server.numels)
        transport.restore_client_state(clients)
        if buffered:
            buffered.restore(state["async"], len(state["rows"]))
        rows = list(state["rows"])
    except StoreError as e:
        raise RunError(f"cannot resume {out}: {e}") from None
    except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as e:
        raise RunError(f"cannot resume {out}: checkpoint.pt is not from this run, or is damaged ({first_line(e)})") \
            from None
    print(f"resuming {out} after round {len(rows)}")
    return rows


def first_line(error):
    """The first line of an exception's message (torch's are often many lines long)."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def print_row(row, total_rounds, clear_progress):
    dense = row["dense_upload_bytes"]  # 0 when no upload arrived in time
    share = f"{row['upload_bytes'] / dense:.1%} of dense" if dense else "none arrived"
    print(f"{CLEAR_LINE if clear_progress else ''}round {row['round']:>3}/{total_rounds}  "
          f"acc {row['accuracy']:.4f}  loss {row['loss']:.4f}  "
          f"upload {row['upload_bytes'] / 1e6:.3f} MB ({share})  "
          f"download {row['download_bytes'] / 1e6:.3f} MB  {row['seconds']:.1f} s"
          + (f"  (simulated {row['round_seconds']:.1f} s, {row['sim_seconds']:.1f} s in all)" if "sim_seconds" in row
             else "") + (f"  epsilon {row['epsilon']:.3g}" if "epsilon" in row else ""), flush=True)


def progress_printer(round_index):
    """A callback (position, count, step, steps) that redraws one progress line, at most 5 times a second."""
    last = [0.0]

    def show(position, count, step, steps):
        now = time.monotonic()
        if now - last[0] > 0.2 or step == steps:
            last[0] = now
            print(f"{CLEAR_LINE}round {round_index}: client {position + 1}/{count}  step {step}/{steps}",
                  end="", flush=True)
    return show
