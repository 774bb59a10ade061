"""End-to-end runs through main.main on the synthetic data: run files, determinism, interrupt and resume."""
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import datasets
import main
import models
from conftest import ROOT, TINY, kept_records, read_csv, without_seconds
from server import Server
from utils import config, run_files

REQUIRED_COLUMNS = {"round", "accuracy", "loss", "upload_bytes", "dense_upload_bytes", "download_bytes", "seconds"}


def call_main(*argv):
    return main.main([str(a) for a in argv])


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def cnn_parameter_count():
    model = models.build("cnn", datasets.SYNTHETIC_SHAPE, 10)
    return sum(p.numel() for p in model.parameters())


# ---- one 3-round run, shared by the checks on its files ----------------------------------------------------------

E2E = {**TINY, "global_epochs": 3, "prop": 0.5}


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    conf = {**E2E, "data_dir": str(base / "data")}
    out = base / "run"
    assert call_main("-c", write_json(base / "conf.json", conf), "--out", out) == 0
    return out, conf


def test_metrics_csv_has_one_row_per_round(e2e_run):
    out, _ = e2e_run
    rows = read_csv(out / "metrics.csv")
    assert REQUIRED_COLUMNS <= set(rows[0])
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    for r in rows:
        clients = [int(c) for c in r["clients"].split()]
        assert len(clients) == 2 and len(set(clients)) == 2 and all(0 <= c < 4 for c in clients)
        assert int(r["rejected"]) == 0
        assert float(r["seconds"]) >= 0


def test_accuracy_rises_above_chance(e2e_run):
    rows = read_csv(e2e_run[0] / "metrics.csv")
    assert float(rows[-1]["accuracy"]) > 0.3  # 10 classes: chance is 0.1
    assert float(rows[-1]["loss"]) < math.log(10)  # below the loss of a uniform guess


def test_byte_counts(e2e_run):
    rows = read_csv(e2e_run[0] / "metrics.csv")
    n = cnn_parameter_count()
    dense_per_client = 11 + 4 * n  # header + every value as f32
    for r in rows:
        upload, dense = int(r["upload_bytes"]), int(r["dense_upload_bytes"])
        assert dense == 2 * dense_per_client
        assert int(r["download_bytes"]) == 2 * dense_per_client
        assert int(r["total_bytes"]) == upload + 2 * dense_per_client
        assert upload < dense
        # random payloads: header + mask seed/prop + 4 bytes per kept entry, for each of the 2 clients
        entries = round(float(r["upload_fraction"]) * 2 * n)
        assert upload == 2 * (11 + 16) + 4 * entries
        assert abs(entries - 0.5 * 2 * n) <= 4 * math.sqrt(2 * n * 0.25)


def test_config_json_holds_the_resolved_config(e2e_run):
    out, conf = e2e_run
    saved = json.loads((out / "config.json").read_text())
    assert set(saved) == set(config.DEFAULTS)
    for key, value in saved.items():
        expected = conf.get(key, config.DEFAULTS[key])
        assert value == expected, key
        if isinstance(config.DEFAULTS[key], float):
            assert isinstance(value, float), key


def test_checkpoint_holds_the_final_model(e2e_run):
    out, _ = e2e_run
    state = run_files.load_checkpoint(out, "cpu")
    assert len(state["rows"]) == 3
    model = models.build("cnn", datasets.SYNTHETIC_SHAPE, 10)
    model.load_state_dict(state["model"])
    data = datasets.load("synthetic", "unused", torch.device("cpu"))
    with torch.no_grad():
        logits = model(data.test_inputs)
    accuracy = (logits.argmax(1) == data.test_labels).float().mean().item()
    loss = F.cross_entropy(logits, data.test_labels).item()
    final = read_csv(out / "metrics.csv")[-1]
    assert accuracy == pytest.approx(float(final["accuracy"]), abs=1e-6)
    assert loss == pytest.approx(float(final["loss"]), abs=1e-4)


def test_read_metrics_matches_the_csv(e2e_run):
    rows = run_files.read_metrics(e2e_run[0])
    plain = read_csv(e2e_run[0] / "metrics.csv")
    assert len(rows) == len(plain) == 3
    for got, raw in zip(rows, plain):
        assert got["upload_bytes"] == float(raw["upload_bytes"]) and got["accuracy"] == float(raw["accuracy"])
        assert got["clients"] == raw["clients"]


def test_occupied_folder_is_refused(e2e_run, run_main, tmp_path):
    out, conf = e2e_run
    before = (out / "metrics.csv").read_text()
    status, _, err = run_main("-c", write_json(tmp_path / "c.json", conf), "--out", out)
    assert status == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert (out / "metrics.csv").read_text() == before


def test_resume_refuses_a_changed_config(e2e_run, run_main):
    out, _ = e2e_run
    before = (out / "metrics.csv").read_text()
    status, _, err = run_main("--out", out, "--resume", "--set", "prop=0.3", "--set", "global_epochs=5")
    assert status == 2 and err.startswith("error:") and "prop" in err and len(err.strip().splitlines()) == 1
    assert (out / "metrics.csv").read_text() == before


# ---- determinism -----------------------------------------------------------------------------------------------

def test_same_config_same_metrics(write_conf, tmp_path):
    conf = write_conf(global_epochs=2, sparsifier="topk", prop=0.2)
    for name in ("a", "b"):
        assert call_main("-c", conf, "--out", tmp_path / name) == 0
    assert call_main("-c", conf, "--set", "seed=1", "--out", tmp_path / "c") == 0
    a, b, c = (read_csv(tmp_path / name / "metrics.csv") for name in ("a", "b", "c"))
    assert len(a) == 2
    assert without_seconds(a) == without_seconds(b)
    assert without_seconds(a) != without_seconds(c)  # the seed matters, so the comparison above can fail
    model_a = run_files.load_checkpoint(tmp_path / "a", "cpu")["model"]
    model_b = run_files.load_checkpoint(tmp_path / "b", "cpu")["model"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)


# ---- interrupt and resume --------------------------------------------------------------------------------------

VARIANTS = {
    "random": {},
    "topk-ef-momentum": {"sparsifier": "topk", "prop": 0.1, "error_feedback": True, "server_momentum": 0.5},
    "dirichlet-roundmask-lambda": {"partition": "dirichlet", "mask": "round", "aggregation": "lambda", "prop": 0.3},
    "clock-deadline-overselect": {"clock": "simulated", "profile": "mixed", "availability": 0.9, "availability_memory": 0.5, "deadline": 0.35,
                                  "over_select": 1.5, "sparsifier": "topk", "prop": 0.1, "error_feedback": True},
    "fedbuff-compressed-download": {"clock": "simulated", "mode": "async", "concurrency": 3, "buffer_size": 2,
                                    "profile": "mixed", "download": "compressed", "error_feedback": True,
                                    "sparsifier": "topk", "prop": 0.1},
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Per variant: (conf file for 2 rounds, metrics of the uninterrupted 4-round run)."""
    base = tmp_path_factory.mktemp("resume")
    results = {}
    for name, overrides in VARIANTS.items():
        conf = write_json(base / f"{name}.json",
                          {**TINY, "global_epochs": 2, "data_dir": str(base / "data"), **overrides})
        out = base / f"{name}-full"
        assert call_main("-c", conf, "--set", "global_epochs=4", "--out", out) == 0
        results[name] = conf, read_csv(out / "metrics.csv")
    return results


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_with_more_rounds_equals_uninterrupted(uninterrupted, tmp_path, variant):
    conf, full = uninterrupted[variant]
    assert len(full) == 4
    out = tmp_path / "run"
    assert call_main("-c", conf, "--out", out) == 0
    assert len(read_csv(out / "metrics.csv")) == 2
    if variant == "random":
        resumed = call_main("--out", out, "--resume", "--set", "global_epochs=4")
    else:  # the conf file may be given again, with only global_epochs changed
        resumed = call_main("-c", conf, "--set", "global_epochs=4", "--out", out, "--resume")
    assert resumed == 0
    assert without_seconds(read_csv(out / "metrics.csv")) == without_seconds(full)
    assert json.loads((out / "config.json").read_text())["global_epochs"] == 4


def interrupt_on_evaluation(monkeypatch, call_number):
    """Make Server.evaluate raise KeyboardInterrupt on its `call_number`-th call (once)."""
    original, calls = Server.evaluate, [0]

    def evaluate(self, images, labels):
        calls[0] += 1
        if calls[0] == call_number:
            raise KeyboardInterrupt
        return original(self, images, labels)
    monkeypatch.setattr(Server, "evaluate", evaluate)
    return calls


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interrupt_then_resume_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch, capsys, variant):
    conf, full = uninterrupted[variant]
    out = tmp_path / "run"
    interrupt_on_evaluation(monkeypatch, 5)  # two a round, on the server's validation split then the test split
    assert call_main("-c", conf, "--set", "global_epochs=4", "--out", out) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    resume_command = shlex.split(err.split("continue with:")[1])
    assert without_seconds(read_csv(out / "metrics.csv")) == without_seconds(full[:2])
    state = run_files.load_checkpoint(out, "cpu")
    assert len(state["rows"]) == 2
    if VARIANTS[variant].get("error_feedback"):
        residuals = kept_records(out)["residual"]
        assert residuals and all(r.abs().sum() > 0 for rs in residuals.values() for r in rs)
    if VARIANTS[variant].get("server_momentum"):
        assert state["velocity"] is not None
    assert resume_command[:2] == ["python", "main.py"]
    assert call_main(*resume_command[2:]) == 0  # the command the message gives
    assert without_seconds(read_csv(out / "metrics.csv")) == without_seconds(full)


def test_resume_needs_the_saved_residuals_and_velocity(uninterrupted, tmp_path):
    """Control for the equality above: a checkpoint without residuals and velocity resumes differently."""
    conf, full = uninterrupted["topk-ef-momentum"]
    out = tmp_path / "run"
    assert call_main("-c", conf, "--out", out) == 0
    path = out / "checkpoint.pt"
    state = run_files.load_checkpoint(path.parent, "cpu")
    state["store"]["records"]["residual"], state["velocity"] = {}, None
    run_files.write_checkpoint(path.parent, state)
    assert call_main("--out", out, "--resume", "--set", "global_epochs=4") == 0
    resumed = without_seconds(read_csv(out / "metrics.csv"))
    assert resumed[:2] == without_seconds(full[:2]) and resumed != without_seconds(full)


def test_interrupt_before_the_first_round(write_conf, tmp_path, monkeypatch, run_main):
    interrupt_on_evaluation(monkeypatch, 1)
    out = tmp_path / "run"
    status, _, err = run_main("-c", write_conf(), "--out", out)
    assert status == 130 and "nothing was saved" in err and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()
    monkeypatch.undo()
    status, _, _ = run_main("-c", write_conf(global_epochs=1), "--out", out)  # nothing saved: start afresh
    assert status == 0 and len(read_csv(out / "metrics.csv")) == 1


@pytest.mark.parametrize("damage", ["config", "checkpoint"])
def test_resume_from_damaged_files_is_a_clear_error(e2e_run, run_main, tmp_path, damage):
    out = tmp_path / "copy"
    shutil.copytree(e2e_run[0], out)
    name = "config.json" if damage == "config" else "checkpoint.pt"
    (out / name).write_bytes((out / name).read_bytes()[:50])
    status, _, err = run_main("--out", out, "--resume")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "cannot resume" in lines[0] and "Traceback" not in err


def test_a_run_whose_every_round_was_refused_says_where_the_reasons_are(write_conf, tmp_path, run_main):
    """The lines that say why a round was refused are printed as it is played: after a --resume, the rounds played
    before it have theirs in an earlier process's output, and metrics.csv marks them."""
    out = tmp_path / "run"
    column = f"the column 'refused' of {out}/metrics.csv"
    status, _, err = run_main("-c", write_conf(lr=1e38, global_epochs=2), "--out", out)  # every upload is NaN
    assert status == 1 and "round 1: " in err and "round 2: " in err
    assert err.strip().splitlines()[-1].endswith("(see the lines above)")
    status, out_text, err = run_main("--out", out, "--resume")  # finished: nothing is played
    lines = err.strip().splitlines()
    assert status == 1 and "round 1/2" not in out_text and len(lines) == 1 and lines[0].startswith("error: no round")
    assert "lines above" not in err
    assert lines[0].endswith(f"(every round was played before this --resume: see {column})")
    status, _, err = run_main("--out", out, "--resume", "--set", "global_epochs=3")  # round 3 is played now
    assert status == 1 and "round 3: " in err and "round 2: " not in err
    assert err.strip().splitlines()[-1].endswith(f"(see the lines above, and for rounds 1 to 2, played before this "
                                                 f"--resume, {column})")
    assert [row["refused"] for row in read_csv(out / "metrics.csv")] == ["1", "1", "1"]


# ---- a stop after the work --------------------------------------------------------------------------------------

# `python main.py ARGS` as a user starts it, but its exit pauses at POINT, says so on stdout ("exiting") and goes on
# after a byte on stdin: `atexit` (Python's signal handlers still in place) or `teardown`, a finalizer that runs as the
# modules are torn down (after Python has put back the default handlers)
PAUSED_EXIT = """
import atexit, os, runpy, sys

def pause(write=os.write, read=os.read):  # bound now: by teardown, a module's globals are cleared
    write(1, b"exiting\\n")
    read(0, 1)

class PauseWhenFreed:
    def __del__(self, pause=pause):
        pause()

point, sys.argv = sys.argv[1], sys.argv[2:]
if point == "atexit":
    atexit.register(pause)
else:
    freed_at_teardown = PauseWhenFreed()
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("point", ["atexit", "teardown"])
def test_sigterm_while_a_finished_run_exits_changes_nothing(tmp_path, point):
    """After `done:` everything is saved: a SIGTERM while the process exits (torch's teardown takes a second) must
    neither print a traceback nor end the finished run by the signal (status -15, as it did)."""
    conf = write_json(tmp_path / "conf.json", {**TINY, "global_epochs": 1, "data_dir": str(tmp_path / "data")})
    process = subprocess.Popen([sys.executable, "-c", PAUSED_EXIT, point, "main.py", "-c", conf,
                                "--out", str(tmp_path / "run")], cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = iter(process.stdout.readline, "")
    assert any(line.startswith("done:") for line in lines) and next(lines) == "exiting\n", process.stderr.read()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(input="go on", timeout=120)
    assert process.returncode == 0 and err == ""
    assert len(read_csv(tmp_path / "run" / "metrics.csv")) == 1


ALLOCATE_AND_FREE = """
import resource, sys, numpy
sys.path.insert(0, {root!r})
from utils import allocator
if {kept}:
    assert allocator.keep_freed_memory()
faults = []
for _ in range(10):  # a round's model-sized arrays: 100 blocks of 1 MB, used and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [numpy.ones(1 << 17) for _ in range(100)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[5:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux's page-fault counts")
def test_freed_memory_is_kept_for_the_next_allocation_so_its_pages_do_not_fault_again():
    """glibc's default hands each freed block of 1 MB back to the kernel (numpy's blocks do so every time; torch's
    sometimes stay, by the heap's layout), so the next one faults its 256 pages in again."""
    pages = 5 * 100 * (1 << 20) // 4096  # touched in the last 5 of 10 rounds
    faults = {kept: int(subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE.format(root=ROOT, kept=kept)],
                                       capture_output=True, text=True, check=True).stdout)
              for kept in (False, True)}
    assert faults[False] > pages / 2 and faults[True] < pages / 20, faults
