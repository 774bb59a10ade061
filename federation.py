"""The round loop, whatever carries the clients' uploads: an engine's transport (engines/).

    rows = federation.run(conf, out, resume, transport_factory)

Each round (`play_round`): sample k clients (`sample_clients`, the one sampling rule), ask the transport to train them
from the global model and hand back their uploads, decode the uploads into the server's sums, aggregate, evaluate, and
save the round to the run folder.
"""
import copy
import sys
import time

import torch

import datasets
import models
from server import Server
from utils import partition, payload, run_files
from utils.seeding import derive_seed, generator

CLEAR_LINE = "\r\033[K"  # carriage return + erase line: replaces the progress line on a terminal


class RunError(Exception):
    """A run that cannot start as asked (nothing to resume, an occupied folder, no CUDA)."""


def sample_clients(conf, round_index):
    """The sorted ids of the k clients that train in round `round_index` (seeded, independent of earlier rounds)."""
    chosen = torch.randperm(conf["no_models"], generator=generator(conf["seed"], "sample", round_index))
    return sorted(chosen[:conf["k"]].tolist())


def run(conf, out, resume, transport_factory):
    """Train `conf` into folder `out` (continuing it when `resume`); returns the metrics rows.

    transport_factory(conf, dataset, shares, model) builds the engine's transport: the object that trains the
    sampled clients and returns their uploads (engines/inprocess.py is the default)."""
    device = pick_device(conf["device"])
    dataset = datasets.load(conf["type"], conf["data_dir"], device)
    shares = partition.split(dataset.train_labels, conf)
    print(f"data: {conf['type']} from {dataset.source}, {len(dataset.train_labels)} train / "
          f"{len(dataset.test_labels)} test; partition {conf['partition']}: "
          f"{partition.summary(shares, dataset.train_labels)}")
    if conf["error_feedback"] and conf["sparsifier"] == "random" and conf["mask"] == "fixed":
        print("note: with a fixed random mask the residual of error feedback is never sent; "
              "set mask to 'round' to send it", file=sys.stderr)
    torch.manual_seed(derive_seed(conf["seed"], "init"))
    server = Server(models.build(conf["model_name"], dataset.image_shape, dataset.num_classes, conf["pretrained"]),
                    conf, device)
    transport = transport_factory(conf, dataset, shares, copy.deepcopy(server.model))
    rows = restore(out, server, transport, device) if resume else []
    run_files.create(out)
    run_files.write_config(out, conf)
    show_progress = sys.stdout.isatty()
    for round_index in range(len(rows) + 1, conf["global_epochs"] + 1):
        rows.append(play_round(round_index, conf, server, transport, dataset, show_progress))
        save(out, server, transport, rows)
        print_row(rows[-1], conf["global_epochs"], show_progress)
    return rows


def play_round(round_index, conf, server, transport, dataset, show_progress=False):
    """One round: sample, train, receive, aggregate, evaluate; returns its metrics row."""
    started = time.perf_counter()
    chosen = sample_clients(conf, round_index)
    progress = progress_printer(round_index) if show_progress else None
    uploads = transport.train(chosen, server.global_state(), round_index, progress)
    upload_bytes, rejected = 0, 0
    for upload in uploads:
        problem = server.receive(upload.payload)
        if problem:
            rejected += 1
            print(f"round {round_index}: rejected client {upload.client_id}'s upload: {problem}", file=sys.stderr)
        upload_bytes += len(upload.payload)
    entries = server.received_entries
    server.aggregate()
    accuracy, loss = server.evaluate(dataset.test_images, dataset.test_labels)
    dense_bytes = payload.dense_size(server.numels)
    return {
        "round": round_index, "accuracy": round(accuracy, 6), "loss": round(loss, 6),
        "train_loss": round(sum(u.train_loss for u in uploads) / len(uploads), 6), "upload_bytes": upload_bytes,
        "dense_upload_bytes": dense_bytes * len(chosen), "download_bytes": dense_bytes * len(chosen),
        "upload_fraction": round(entries / (sum(server.numels) * len(chosen)), 6),
        "clients": " ".join(map(str, chosen)), "rejected": rejected,
        "seconds": round(time.perf_counter() - started, 3),
    }


def pick_device(asked):
    if asked == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' was asked for, but CUDA is not available here")
    return torch.device("cuda" if asked != "cpu" and torch.cuda.is_available() else "cpu")


def save(out, server, transport, rows):
    """Checkpoint first, then metrics.csv from the same rows, so the two never disagree after a restart."""
    run_files.save_checkpoint(out, {
        "rows": rows,
        "model": server.model.state_dict(),
        "velocity": server.velocity,
        "residuals": transport.client_state(),
    })
    run_files.write_metrics(out, rows)


def restore(out, server, transport, device):
    try:
        state = run_files.load_checkpoint(out, device)
        server.model.load_state_dict(state["model"])
    except Exception as e:  # torch.load and load_state_dict raise many kinds for a damaged file
        raise RunError(f"cannot resume {out}: checkpoint.pt is damaged or from another model ({e})") from None
    server.velocity = state["velocity"]
    transport.restore_client_state(state["residuals"])
    print(f"resuming {out} after round {len(state['rows'])}")
    return state["rows"]


def print_row(row, total_rounds, clear_progress):
    share = row["upload_bytes"] / row["dense_upload_bytes"]
    print(f"{CLEAR_LINE if clear_progress else ''}round {row['round']:>3}/{total_rounds}  "
          f"acc {row['accuracy']:.4f}  loss {row['loss']:.4f}  "
          f"upload {row['upload_bytes'] / 1e6:.3f} MB ({share:.1%} of dense)  {row['seconds']:.1f} s", flush=True)


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
