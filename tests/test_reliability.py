"""The promises a careless or hostile user tests: the global model stays finite, bad input is one line and status 2,
interrupted or stopped runs lose nothing, two runs never share a folder, SIGTERM is a clean stop."""
import fcntl
import gzip
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import main
from conftest import ROOT, TINY, read_csv, without_seconds
from server import Server
import codec
from conftest import handmade_upload, lenient
from utils import plot, run_files

CPU = torch.device("cpu")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def one_error_line(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


def spawn(*argv):
    """main.py in a process of its own, as a user starts it."""
    return subprocess.Popen([sys.executable, "main.py", *map(str, argv)], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def in_own_filesystem(script, *args):
    """Run a shell `script` in a private mount namespace (unshare works without root), where it may mount a tmpfs.

    $PYTHON is this interpreter; $1, $2, ... are `args`."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *map(str, args)], cwd=ROOT,
                          env={**SUBPROCESS_ENV, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=300)


def state_is_finite(model_state):
    return all(torch.isfinite(t).all() for t in model_state.values() if torch.is_floating_point(t))


# ---- 1. the global model never becomes non-finite ----------------------------------------------------------------

def dense_upload(num_samples, values):
    """A dense upload for nn.Linear(3, 2): weight then bias, flat."""
    return handmade_upload(num_samples, [values[:6], values[6:]])


@pytest.mark.parametrize("rule", ["masked_mean", "mean"])
def test_huge_finite_uploads_average_without_overflow(tiny_model, make_conf, rule):
    """1e36 from 750 samples: n * value = 7.5e38 overflows float32, the average 1e36 does not."""
    server = lenient(Server(tiny_model, make_conf(aggregation=rule), CPU))
    assert server.receive(dense_upload(750, [1e36] * 8)) is None
    assert server.receive(dense_upload(750, [1e36] * 8)) is None
    assert server.aggregate() is None
    weights = tiny_model.weight.detach().flatten().tolist()
    assert all(w == pytest.approx(1e36, rel=1e-6) for w in weights)


def test_a_non_finite_aggregate_is_refused_and_the_model_kept(tiny_model, make_conf):
    # lambda rule: 100 * 2 clients * mean 3e38 = 6e40, beyond float32: the step must not be taken
    server = lenient(Server(tiny_model, make_conf(aggregation="lambda", server_momentum=0.5, **{"lambda": 100.0}), CPU))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    server.receive(dense_upload(5, [1.0] * 8))
    assert server.aggregate() is None  # an ordinary round first, so the momentum buffer exists
    after_first = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    velocity = [v.clone() for v in server.velocity]
    assert not all(torch.equal(before[k], after_first[k]) for k in before)
    assert server.receive(dense_upload(5, [3e38] * 8)) is None
    assert server.receive(dense_upload(5, [3e38] * 8)) is None
    reason = server.aggregate()
    assert reason and "non-finite" in reason
    assert all(torch.equal(after_first[k], v) for k, v in tiny_model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(velocity, server.velocity))
    server.receive(dense_upload(5, [1.0] * 8))  # the next round starts from clean sums
    assert server.aggregate() is None and state_is_finite(tiny_model.state_dict())


def test_a_diverging_run_keeps_a_finite_model(write_conf, tmp_path, run_main):
    out = tmp_path / "run"
    status, _, _ = run_main("-c", write_conf(lr=100.0), "--out", out)
    assert status in (0, 1)
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 3
    assert state_is_finite(run_files.load_checkpoint(out, "cpu")["model"])


def test_a_run_whose_every_round_is_refused_says_so(write_conf, tmp_path, run_main):
    out = tmp_path / "run"
    status, out_text, err = run_main("-c", write_conf(lr=1e38), "--out", out)  # every upload overflows to NaN
    rows = read_csv(out / "metrics.csv")
    assert [int(r["refused"]) for r in rows] == [1, 1, 1]
    assert all(int(r["rejected"]) == 2 for r in rows)
    assert status == 1 and "done:" not in out_text
    assert err.strip().splitlines()[-1].startswith("error: no round of")
    assert "the global model stays as it was" in err


# ---- 2. tracebacks become one line and status 2 ----------------------------------------------------------------

def test_out_that_is_a_file_or_lies_under_one(write_conf, tmp_path, run_main):
    conf = write_conf()
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "run"):
        status, _, err = run_main("-c", conf, "--out", out)
        assert status == 2 and one_error_line(err) and "file" in err
    assert blocker.read_text() == "keep me"


def test_out_on_a_read_only_filesystem(write_conf, tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    result = in_own_filesystem('mount -t tmpfs tmpfs "$1" && mount -o remount,ro "$1" && '
                               '"$PYTHON" main.py -c "$2" --out "$1/run"', mount, write_conf())
    assert result.returncode == 2, result.stderr
    assert one_error_line(result.stderr) and "not writable" in result.stderr


def test_disk_full_while_saving_keeps_the_saved_rounds(tmp_path, write_conf):
    """A 1 MB filesystem holds one checkpoint of the synthetic CNN (0.6 MB) but not a second beside it."""
    conf = write_conf(global_epochs=4)
    mount, copy = tmp_path / "mnt", tmp_path / "copy"
    mount.mkdir()
    result = in_own_filesystem('mount -t tmpfs -o size=1m tmpfs "$1" && "$PYTHON" main.py -c "$2" --out "$1/run"; '
                               'status=$?; cp -a "$1/run" "$3"; exit $status', mount, conf, copy)
    assert result.returncode == 2
    assert one_error_line(result.stderr) and "No space left on device" in result.stderr
    assert "continue with: python main.py --out" in result.stderr
    assert sorted(os.listdir(copy)) == [".lock", "checkpoint.pt", "config.json", "environment.json",
                                        "metrics.csv"]  # no *.tmp
    saved = run_files.load_checkpoint(copy, "cpu")["rows"]
    assert len(saved) >= 1 and len(read_csv(copy / "metrics.csv")) == len(saved)
    # what was saved is good: resumed on a roomy disk, the run ends as an uninterrupted one
    assert main.main(["--out", str(copy), "--resume"]) == 0
    assert main.main(["-c", conf, "--out", str(tmp_path / "full")]) == 0
    assert without_seconds(read_csv(copy / "metrics.csv")) == without_seconds(read_csv(tmp_path / "full" / "metrics.csv"))


def test_numbers_with_thousands_of_digits(write_conf, tmp_path, run_main):
    digits = "1" * 5000
    status, _, err = run_main("-c", write_conf(), "--set", f"seed={digits}", "--out", tmp_path / "a")
    assert status == 2 and one_error_line(err) and "seed" in err and len(err) < 200
    conf = tmp_path / "big.json"
    conf.write_text('{"type": "synthetic", "seed": ' + digits + "}")
    status, _, err = run_main("-c", conf, "--out", tmp_path / "b")
    assert status == 2 and one_error_line(err) and len(err) < 300


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def idx_dataset(directory, image_size=28, train=12, test=6, label_offset=0):
    """The four Fashion-MNIST IDX files with random images; returns the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, image_size, image_size), generator=g, dtype=torch.uint8)
        labels = (torch.arange(count) % 10 + label_offset).to(torch.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def run_on_data(run_main, tmp_path, data_dir, name="fashion-mnist"):
    conf = write_json(tmp_path / "conf.json", {"type": name, "data_dir": str(data_dir), "no_models": 2, "k": 1,
                                               "global_epochs": 1})
    return run_main("-c", conf, "--out", tmp_path / "run")


def corrupt_deflate(path):
    """Flip the first byte of the deflate stream (after gzip's 10-byte header, written without a file name): zlib
    itself fails ('invalid stored block lengths'), not gzip's header or CRC check."""
    data = bytearray(gzip.compress(gzip.decompress(path.read_bytes())))
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["deflate", "short header", "empty split", "2x2 images", "label 255"])
def test_bad_data_files_are_one_line(tmp_path, run_main, offline, damage):
    data = tmp_path / "data" / "fashion-mnist"
    if damage == "2x2 images":
        idx_dataset(data, image_size=2)
    elif damage == "empty split":
        idx_dataset(data, test=0)
    elif damage == "label 255":
        idx_dataset(data, label_offset=246)  # labels 246..255: 256 classes if trusted
    else:
        idx_dataset(data, train=600)
    if damage == "deflate":
        corrupt_deflate(data / "train-images-idx3-ubyte.gz")
    if damage == "short header":  # an IDX header promising 3 dimensions, cut after the first
        with gzip.open(data / "t10k-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + (6).to_bytes(4, "big"))
    status, _, err = run_on_data(run_main, tmp_path, tmp_path / "data")
    assert status == 2 and one_error_line(err), err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_garbage_in_torchvisions_layout_is_one_line(tmp_path, run_main, offline):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"<html>rate limited</html>" * 40)
    status, _, err = run_on_data(run_main, tmp_path, tmp_path / "data", name="mnist")
    assert status == 2 and one_error_line(err) and str(tmp_path / "data") in err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-round run with error feedback (so its checkpoint holds clients' residuals)."""
    base = tmp_path_factory.mktemp("finished")
    conf = write_json(base / "conf.json", {**TINY, "data_dir": str(base / "data"), "sparsifier": "topk",
                                           "prop": 0.1, "error_feedback": True})
    assert main.main(["-c", conf, "--out", str(base / "run")]) == 0
    return base / "run", conf


def copy_run(run_dir, target):
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns(run_files.LOCK_NAME))
    return target


@pytest.mark.parametrize("content", ["[1, 2]", "null", "7"])
def test_resume_with_a_config_json_that_is_not_an_object(finished_run, tmp_path, run_main, content):
    out = copy_run(finished_run[0], tmp_path / "run")
    (out / "config.json").write_text(content)
    status, _, err = run_main("--out", out, "--resume")
    assert status == 2 and one_error_line(err) and "config.json" in err and "not a JSON object" in err


def test_resume_with_a_checkpoint_of_another_run(finished_run, tmp_path, run_main):
    """Same model, more clients: the checkpoint's residuals belong to clients this run does not have."""
    run_dir, _ = finished_run
    other = tmp_path / "other"
    conf = write_json(tmp_path / "c.json", {**json.loads((run_dir / "config.json").read_text()), "no_models": 2,
                                            "k": 1})
    assert main.main(["-c", conf, "--out", str(other), "--set", "global_epochs=1"]) == 0
    (other / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())
    before = (other / "metrics.csv").read_text()
    status, _, err = run_main("--out", other, "--resume")
    assert status == 2 and one_error_line(err) and "no_models" in err
    assert (other / "metrics.csv").read_text() == before


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_imports_is_a_clean_stop(write_conf, tmp_path, signum, status):
    process = spawn("-c", write_conf(), "--out", tmp_path / "run")
    # torch's libraries mapped into the process: main.py is importing (which takes seconds), nothing else yet
    wait_for(lambda: "libtorch" in open(f"/proc/{process.pid}/maps").read())
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    assert "Traceback" not in err and "nothing was saved" in err
    assert not (tmp_path / "run").exists()


# ---- 3. metrics.csv always equals the checkpoint's rows -------------------------------------------------------

@pytest.mark.parametrize("damage", ["deleted", "one row short"])
def test_resume_of_a_finished_run_restores_metrics(finished_run, tmp_path, run_main, damage):
    out = copy_run(finished_run[0], tmp_path / "run")
    full = (out / "metrics.csv").read_text()
    if damage == "deleted":
        os.remove(out / "metrics.csv")
    else:  # as a kill -9 between the checkpoint write and the metrics write leaves it
        (out / "metrics.csv").write_text("".join(full.splitlines(keepends=True)[:-1]))
    status, out_text, _ = run_main("--out", out, "--resume")
    assert status == 0 and "done:" in out_text
    assert (out / "metrics.csv").read_text() == full


def test_a_signal_while_saving_waits_until_both_files_are_written(write_conf, tmp_path, run_main, monkeypatch):
    write_metrics, calls = run_files.write_metrics, []

    def signal_midway(run_dir, rows):  # Ctrl-C lands after the checkpoint was written, before metrics.csv
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        write_metrics(run_dir, rows)
    monkeypatch.setattr(run_files, "write_metrics", signal_midway)
    out = tmp_path / "run"
    status, out_text, err = run_main("-c", write_conf(), "--out", out)
    assert status == 130 and "continue with" in err
    saved = run_files.load_checkpoint(out, "cpu")["rows"]
    assert len(saved) == 2 and len(read_csv(out / "metrics.csv")) == 2
    assert "round   2/3" in out_text  # the last saved round is shown before the stop is delivered


@pytest.mark.parametrize("settings", [dict(prop=0.0), dict(aggregation="lambda", **{"lambda": 0.0})])
def test_a_run_in_which_no_round_changed_the_model_says_so(write_conf, tmp_path, run_main, settings):
    out = tmp_path / "run"
    status, out_text, err = run_main("-c", write_conf(**settings), "--out", out)
    assert [int(r["refused"]) for r in read_csv(out / "metrics.csv")] == [1, 1, 1]
    assert status == 1 and "done:" not in out_text
    assert err.strip().splitlines()[-1].startswith("error: no round of")
    assert "the accepted uploads changed no entry of the global model" in err


# ---- 4. one run per folder -------------------------------------------------------------------------------------

def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_run_on_the_same_folder_is_refused_and_sigterm_stops_the_first(write_conf, tmp_path):
    out = tmp_path / "run"
    # 100 local epochs: the first run holds the folder for seconds before its first round is saved
    first = spawn("-c", write_conf(global_epochs=3, local_epochs=100, prop=0.5), "--out", out)
    wait_for(lambda: (out / run_files.LOCK_NAME).exists())
    second = spawn("-c", write_conf(global_epochs=2, prop=0.9), "--out", out)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and one_error_line(err) and "in use by another run" in err, err
    assert not run_files.holds_run(out)  # the first run had not saved a round: only the lock kept the second out
    first.send_signal(signal.SIGTERM)  # as a scheduler preempting the job
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143 and "Traceback" not in err and "SIGTERM" in err
    assert json.loads((out / "config.json").read_text())["prop"] == 0.5
    assert [name for name in os.listdir(out) if name.endswith(".tmp")] == []


def test_a_held_lock_refuses_even_before_anything_is_saved(write_conf, tmp_path, run_main):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / run_files.LOCK_NAME, "a+") as held:  # a lock taken through another open file, as another run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, _, err = run_main("-c", write_conf(), "--out", out)
    assert status == 2 and one_error_line(err) and "in use" in err
    assert not (out / "config.json").exists()
    status, _, _ = run_main("-c", write_conf(), "--out", out)  # released: the folder is free again
    assert status == 0


# ---- 5. a stop while the sweep's figure is drawn -----------------------------------------------------------------

def test_ctrl_c_while_the_sweep_figure_is_drawn(write_conf, tmp_path, run_main, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["-c", write_conf(global_epochs=1), "--sweep", "prop=1.0,0.5", "--out", out]

    def interrupted_drawing(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(plot, "plot_runs", interrupted_drawing)
    status, _, err = run_main(*argv)
    assert status == 130 and "nothing was saved" not in err
    command = shlex.split(err.split("continue with:")[1])
    assert "--sweep" in command and "--resume" in command
    monkeypatch.undo()
    status, _, _ = run_main(*command[2:])
    assert status == 0 and (out / "comparison.png").exists()


def test_a_sweep_checks_every_values_data_before_the_first_run(write_conf, tmp_path, run_main, offline):
    out = tmp_path / "sweep"
    status, _, err = run_main("-c", write_conf(global_epochs=1), "--sweep", "type=synthetic,mnist", "--out", out)
    assert status == 2 and one_error_line(err) and "mnist data not found" in err
    assert not (out / "type=synthetic").exists()


# ---- 6. --resume may only raise global_epochs ------------------------------------------------------------------

def test_resume_cannot_lower_global_epochs(finished_run, tmp_path, run_main):
    out = copy_run(finished_run[0], tmp_path / "run")
    before = (out / "config.json").read_text()
    status, _, err = run_main("--out", out, "--resume", "--set", "global_epochs=1")
    assert status == 2 and one_error_line(err) and "global_epochs" in err
    assert (out / "config.json").read_text() == before


# ---- 7. random-mask uploads with an impossible density ---------------------------------------------------------

@pytest.mark.parametrize("prop", [float("nan"), -0.5, 1.5, float("inf")])
def test_random_upload_with_an_impossible_density_is_rejected(tiny_model, make_conf, prop):
    # self-consistent: the values of the entries a mask drawn with this density keeps (none, or all of them)
    forged = codec.encode({"sparsifier": "random", "quantize": "none", "prop": prop}, [torch.ones(6), torch.ones(2)],
                          10, mask_seed=3).payload
    with pytest.raises(codec.PayloadError):
        codec.decode(forged, [6, 2])
    server = Server(tiny_model, make_conf(aggregation="mean"), CPU)
    assert "malformed" in server.receive(forged)


# ---- 8. every error is one line --------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", ["random bytes", "empty", "another model"])
def test_a_bad_checkpoint_is_one_line(finished_run, tmp_path, run_main, checkpoint):
    out = copy_run(finished_run[0], tmp_path / "run")
    if checkpoint == "random bytes":
        (out / "checkpoint.pt").write_bytes(b"\x80\xde" + os.urandom(5000))  # a pickle opcode torch warns about first
    elif checkpoint == "empty":
        (out / "checkpoint.pt").write_bytes(b"")
    else:
        state = run_files.load_checkpoint(out, "cpu")
        state["model"] = torch.nn.Linear(3, 2).state_dict()
        del state["config"]  # as a checkpoint from before checkpoints held their config
        run_files.write_checkpoint(out, state)
    status, _, err = run_main("--out", out, "--resume")
    assert status == 2 and one_error_line(err) and "checkpoint.pt" in err


def folder_bytes(folder):
    """Every file of a run folder (its client store's too) and its bytes, but the lock any run takes (created empty
    where it is missing)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != run_files.LOCK_NAME}


@pytest.mark.parametrize("where", ["the global model", "the server momentum", "a client's residual"])
@pytest.mark.parametrize("damage", ["one flipped bit", "NaN, with a new digest"])
def test_a_damaged_checkpoint_is_refused_in_one_line_and_the_folder_left_as_it_was(momentum_run, tmp_path, run_main,
                                                                                  where, damage):
    """One bit of a tensor's bytes flipped in the file (an exponent bit: a weight of 4e36, as a disk error makes): the
    digest written with the checkpoint (or with the client's record in the store) refuses it. A NaN saved with a digest
    made anew (a bug, or a hand edit): every restored tensor is checked finite."""
    out = copy_run(momentum_run, tmp_path / "run")
    state = run_files.load_checkpoint(out, "cpu")
    store = out / "clients" / "residuals.bin"  # the client store, whose records the checkpoint names
    client, (slot, _) = next(iter(state["store"]["records"]["residual"].items()))
    record = 4 * sum(state["store"]["numels"]["residual"])
    record_at = slot * state["store"]["slot_bytes"]["residual"]  # slots of records past 64 KB are rounded up to 4 KB
    if where == "a client's residual":
        named = "clients/residuals.bin"
        data = bytearray(store.read_bytes())
        if damage == "one flipped bit":
            data[record_at + 3] ^= 0x40  # the first f32's highest exponent bit
            reason = f"client {client}'s residual does not match the SHA-256 digest saved with it"
        else:
            data[record_at:record_at + 4] = struct.pack("<f", math.nan)
            digest = hashlib.sha256(data[record_at:record_at + record]).digest()
            state["store"]["records"]["residual"][client] = (slot, digest)
            run_files.write_checkpoint(out, state)
            reason = "holds NaN or Inf"
        store.write_bytes(bytes(data))
    else:
        tensor = {"the global model": state["model"]["3.weight"], "the server momentum": state["velocity"][0]}[where]
        named = "checkpoint.pt"
        if damage == "one flipped bit":
            data = bytearray((out / "checkpoint.pt").read_bytes())
            at = bytes(data).find(bytes(tensor.untyped_storage())[:64])  # torch.save stores a storage's bytes as is
            assert at > 0
            data[at + 3] ^= 0x40  # the first f32's highest exponent bit
            (out / "checkpoint.pt").write_bytes(bytes(data))
            reason = "its content does not match the SHA-256 digest written with it"
        else:
            tensor[(0,) * tensor.dim()] = math.nan
            run_files.write_checkpoint(out, state)
            reason = "holds NaN or Inf"
    before = folder_bytes(out)
    status, out_text, err = run_main("--out", out, "--resume", "--set", "global_epochs=4")
    assert status == 2 and one_error_line(err) and named in err and reason in err, err
    assert "round " not in out_text and folder_bytes(out) == before


@pytest.fixture(scope="module")
def momentum_run(tmp_path_factory):
    """A finished 2-round run whose checkpoint holds a model, server momentum and clients' residuals."""
    base = tmp_path_factory.mktemp("momentum")
    conf = write_json(base / "conf.json", {**TINY, "data_dir": str(base / "data"), "global_epochs": 2,
                                           "sparsifier": "topk", "prop": 0.1, "error_feedback": True,
                                           "server_momentum": 0.5})
    assert main.main(["-c", conf, "--out", str(base / "run")]) == 0
    return base / "run"


# ---- 9. SIGTERM: the same clean stop as Ctrl-C, then an exact resume -------------------------------------------

def test_sigterm_then_resume_equals_an_uninterrupted_run(write_conf, tmp_path):
    conf = write_conf(global_epochs=12, sparsifier="topk", prop=0.1, error_feedback=True)
    out = tmp_path / "run"
    process = spawn("-c", conf, "--out", out)
    wait_for(lambda: (out / "metrics.csv").exists())
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in err and "SIGTERM" in err
    saved = len(read_csv(out / "metrics.csv"))
    assert saved == len(run_files.load_checkpoint(out, "cpu")["rows"])
    assert main.main(["--out", str(out), "--resume"]) == 0
    assert main.main(["-c", conf, "--out", str(tmp_path / "full")]) == 0
    assert without_seconds(read_csv(out / "metrics.csv")) == without_seconds(read_csv(tmp_path / "full" / "metrics.csv"))


# ---- a fresh machine: one setup script for the README and CI ---------------------------------------------------

def test_readme_and_ci_install_through_the_setup_script():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    quick_start = readme.split("\n## Quick start\n")[1].split("\n## ")[0]  # up to the next section
    assert "pip install" not in quick_start
    blocks = [block.strip().splitlines() for block in quick_start.split("```")[1::2]]
    # the first run and the tests, each in the environment setup.sh made
    assert blocks[0] == ["bash setup.sh", ". .venv/bin/activate", "python main.py -c ./utils/conf.json"]
    ci_commands = [line for line in ci.splitlines()[1:] if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == blocks[-1] == ["bash setup.sh", ". .venv/bin/activate", "python -m pytest -q tests"]


def wheel(folder, name):
    """A wheel of one module `name` that holds VALUE = 1, written by hand: a package pip installs offline."""
    path = os.path.join(folder, f"{name}-1.0-py3-none-any.whl")
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 1\n", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{file},,\n" for file in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
    return path


def test_setup_installs_into_a_new_venv_beside_an_externally_managed_python(tmp_path):
    """Debian 12's or Ubuntu 24.04's own Python refuses pip installs (PEP 668): setup.sh, run with it and no virtual
    environment active, makes .venv and installs the pinned requirements (requirements.lock) there."""
    system_python = "/usr/bin/python3"
    managed = ("import os, sysconfig; "
               "print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))")
    if not os.path.exists(system_python) or subprocess.run([system_python, "-c", managed], capture_output=True,
                                                           text=True).stdout.strip() != "True":
        pytest.skip("no externally managed Python in /usr/bin here")
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        pytest.skip("setup.sh would install Fashion-MNIST on this machine")  # a test must not install packages
    shutil.copy(os.path.join(ROOT, "setup.sh"), tmp_path)
    (tmp_path / "requirements.lock").write_text(wheel(tmp_path, "fedsparse_setup_probe") + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHON")}
    env["PATH"] = "/usr/bin:/bin"  # python3 is the distribution's, as on a fresh machine
    for _ in range(2):  # a second run finds .venv and installs into it again
        result = subprocess.run(["bash", str(tmp_path / "setup.sh")], env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr
    probe = [str(tmp_path / ".venv" / "bin" / "python"), "-c",
             "import sys, fedsparse_setup_probe; print(sys.prefix != sys.base_prefix, fedsparse_setup_probe.VALUE)"]
    assert subprocess.run(probe, capture_output=True, text=True).stdout.split() == ["True", "1"]
    system = subprocess.run([system_python, "-c", "import fedsparse_setup_probe"], capture_output=True, env=env)
    assert system.returncode != 0  # not installed into the distribution's Python
