"""A run's folder: config.json, metrics.csv and checkpoint.pt, each replaced atomically so none is ever half-written,
and a lock that keeps a second run out of the folder while the first one lives."""
import contextlib
import csv
import fcntl
import glob
import hashlib
import io
import json
import os
import platform
import signal
import threading
import warnings

import numpy
import torch

METRICS_COLUMNS = ("round", "accuracy", "loss", "train_loss", "upload_bytes", "dense_upload_bytes",
                   "download_bytes", "total_bytes", "upload_fraction", "syncs_replay", "syncs_changed", "syncs_dense",
                   "clients", "rejected", "refused", "seconds")
# with secure aggregation (secure.py): the protocol's own bytes, and the entries of the round's sum that wrapped
SECAGG_COLUMNS = ("secagg_up_bytes", "secagg_down_bytes", "secagg_overflows")
# with the simulated clock (clock.py)
TIME_COLUMNS = ("round_seconds", "sim_seconds", "dropped", "dropped_download_bytes", "dropped_upload_bytes")
# clients.csv, with the clock: one row per round and sampled client
CLIENT_COLUMNS = ("round", "client", "download_bytes", "steps", "upload_bytes", "download_s", "compute_s", "upload_s",
                  "finish_s", "arrived")
LOCK_NAME = ".lock"
CHECKPOINT_MAGIC = b"fedsparse checkpoint, sha256\n"  # then the digest of the rest, which torch.save writes
DIGEST_SIZE = 32
BODY_AT = len(CHECKPOINT_MAGIC) + DIGEST_SIZE


class RunError(Exception):
    """A run that cannot start or go on as asked (nothing to resume, an occupied or unwritable folder, no CUDA), or a
    run folder that cannot be read back."""


class CheckpointError(ValueError):
    """checkpoint.pt is not what a run saved."""


class SaveError(RunError):
    """A file of the run could not be written (a full disk, a folder that became read-only)."""


def check_writable(run_dir):
    """Fail early, before data is loaded, when `run_dir` cannot become a run folder."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunError(f"--out {run_dir} is a file, not a folder")
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunError(f"--out {run_dir} lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"--out {run_dir}: {existing} is not writable")


@contextlib.contextmanager
def locked(run_dir):
    """Create `run_dir` and hold an advisory lock on it for the block; a second holder is refused at once."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock_file = open(os.path.join(run_dir, LOCK_NAME), "a+")
    except OSError as e:
        raise RunError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from None
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{run_dir} is in use by another run; wait for it to end or choose another --out") from None
        for leftover in glob.glob(os.path.join(glob.escape(run_dir), "*.tmp")):  # from a run killed mid-write
            os.remove(leftover)
        yield


def write_atomically(path, data):
    """Write bytes to a temporary file beside `path`, then rename it over `path` (atomic on POSIX)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise SaveError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM until the block ends, so a stop never falls between writes that belong together."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    pending = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def write_config(run_dir, conf):
    write_atomically(os.path.join(run_dir, "config.json"), (json.dumps(conf, indent=2) + "\n").encode())


def write_environment(run_dir, device, first_round, client_threads):
    """Add to environment.json what computes the rounds from `first_round` on (one entry per start or resume): a run
    repeats to the last digit only with the same torch build and CPU family, whose kernels round differently, and the
    same thread counts (this process's, and the `client_threads` each client trains with)."""
    path = os.path.join(run_dir, "environment.json")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        entries = entries if isinstance(entries, list) else []
    except (OSError, ValueError):  # none yet, or damaged: what it said cannot be trusted anyway
        entries = []
    entries.append({
        "from_round": first_round, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "client_threads": client_threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "platform": platform.platform()})
    write_atomically(path, (json.dumps(entries, indent=2) + "\n").encode())


def cpu_name():
    """The CPU's model name, as /proc/cpuinfo gives it on Linux (platform.processor() says only 'x86_64' there)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_config(run_dir):
    """The JSON object in config.json; ValueError when the file holds something else."""
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    if not isinstance(conf, dict):
        kind = {list: "an array", type(None): "null", str: "a string", bool: "a boolean"}.get(type(conf), "a number")
        raise ValueError(f"it holds {kind}, not a JSON object")
    return conf


def write_metrics(run_dir, rows):
    """metrics.csv from the rows; with the simulated clock also its time columns, and clients.csv from the rows'
    timings."""
    timed = bool(rows) and "round_seconds" in rows[0]
    buffered = bool(rows) and "staleness" in rows[0]  # FedBuff's
    write_csv(os.path.join(run_dir, "metrics.csv"),
              METRICS_COLUMNS + (TIME_COLUMNS if timed else ()) + (("staleness",) if buffered else ())
              + (("epsilon",) if rows and "epsilon" in rows[0] else ())
              + (SECAGG_COLUMNS if rows and "secagg_overflows" in rows[0] else ()), rows)
    if timed:
        write_csv(os.path.join(run_dir, "clients.csv"),
                  CLIENT_COLUMNS + (("start_s", "staleness") if buffered else ()), client_rows(rows))


def client_rows(rows):
    """clients.csv's rows: each round's timings (clock.Timing.row), its seconds to 6 decimals."""
    for row in rows:
        for timing in row["timings"]:
            yield {"round": row["round"], **{key: round(value, 6) if isinstance(value, float) else value
                                             for key, value in timing.items()}, "arrived": int(timing["arrived"])}


def write_csv(path, columns, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, text.getvalue().encode())


def read_metrics(run_dir):
    """Rows of metrics.csv as dicts of numbers (but 'clients', the space-separated ids sampled that round); an empty
    cell leaves its key out. ValueError names the line of a cell that is not a number."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as f:
        reader, rows = csv.DictReader(f, restval=""), []
        for row in reader:
            if None in row:  # DictReader files cells beyond the header under None
                raise ValueError(f"line {reader.line_num} has more cells than the header")
            try:
                rows.append({key: value if key == "clients" else float(value) for key, value in row.items()
                             if value != ""})
            except ValueError as e:
                raise ValueError(f"line {reader.line_num}: {e}") from None
        return rows


def upload_totals(rows):
    """(bytes uploaded, bytes a dense upload would have taken) over a run's metrics rows."""
    return sum(row["upload_bytes"] for row in rows), sum(row["dense_upload_bytes"] for row in rows)


def checkpoint_path(run_dir):
    return os.path.join(run_dir, "checkpoint.pt")


def holds_run(run_dir):
    """Whether a run has saved a round in `run_dir` (and so can be resumed there, and not started afresh)."""
    return os.path.exists(checkpoint_path(run_dir))


def save(run_dir, state):
    """The checkpoint (`state`, holding the metrics `rows`), then metrics.csv from the same rows, as one step that no
    signal splits; if a kill -9 does, resuming rewrites metrics.csv from the checkpoint."""
    with signals_held():
        write_checkpoint(run_dir, state)
        write_metrics(run_dir, state["rows"])


def write_checkpoint(run_dir, state):
    """checkpoint.pt: CHECKPOINT_MAGIC, the SHA-256 digest of what follows, then `state` as torch.save writes it."""
    buffer = io.BytesIO()
    buffer.write(CHECKPOINT_MAGIC + bytes(DIGEST_SIZE))
    torch.save(state, buffer)
    data = buffer.getbuffer()
    data[len(CHECKPOINT_MAGIC):BODY_AT] = hashlib.sha256(data[BODY_AT:]).digest()
    del data  # a BytesIO cannot give its bytes while a view of them lives
    write_atomically(checkpoint_path(run_dir), buffer.getvalue())


def load_checkpoint(run_dir, device):
    """What write_checkpoint saved, on `device`. CheckpointError when the file is not one, or its content is not what
    was written: torch.load reads a flipped bit or a NaN patched into a tensor without a word."""
    with open(checkpoint_path(run_dir), "rb") as f:
        data = f.read()
    if not data.startswith(CHECKPOINT_MAGIC) or len(data) < BODY_AT:
        raise CheckpointError("it is not a fedsparse checkpoint (or one written before checkpoints carried a digest)")
    body = memoryview(data)[BODY_AT:]
    if hashlib.sha256(body).digest() != data[len(CHECKPOINT_MAGIC):BODY_AT]:
        raise CheckpointError("its content does not match the SHA-256 digest written with it: it was changed or "
                              "damaged after it was saved")
    with warnings.catch_warnings():  # a damaged file can make torch warn before it fails: the failure says enough
        warnings.simplefilter("ignore")
        return torch.load(io.BytesIO(body), map_location=device, weights_only=True)
