"""A run's folder: config.json, metrics.csv and checkpoint.pt, each replaced atomically so none is ever half-written."""
import csv
import io
import json
import os

import torch

METRICS_COLUMNS = ("round", "accuracy", "loss", "train_loss", "upload_bytes", "dense_upload_bytes",
                   "download_bytes", "upload_fraction", "clients", "rejected", "seconds")


def create(run_dir):
    os.makedirs(run_dir, exist_ok=True)


def write_atomically(path, data):
    """Write bytes to a temporary file beside `path`, then rename it over `path` (atomic on POSIX)."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_config(run_dir, conf):
    write_atomically(os.path.join(run_dir, "config.json"), (json.dumps(conf, indent=2) + "\n").encode())


def read_config(run_dir):
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def write_metrics(run_dir, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(os.path.join(run_dir, "metrics.csv"), text.getvalue().encode())


def read_metrics(run_dir):
    """Rows of metrics.csv as dicts of numbers (but 'clients', the space-separated ids sampled that round)."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as f:
        return [{key: value if key == "clients" else float(value) for key, value in row.items()}
                for row in csv.DictReader(f)]


def upload_totals(rows):
    """(bytes uploaded, bytes a dense upload would have taken) over a run's metrics rows."""
    return sum(row["upload_bytes"] for row in rows), sum(row["dense_upload_bytes"] for row in rows)


def checkpoint_path(run_dir):
    return os.path.join(run_dir, "checkpoint.pt")


def save_checkpoint(run_dir, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(checkpoint_path(run_dir), buffer.getvalue())


def load_checkpoint(run_dir, device):
    return torch.load(checkpoint_path(run_dir), map_location=device, weights_only=True)
