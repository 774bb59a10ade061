"""Sweeps, the plot/table tool, and the docs' promise to document every config key and compression method."""
import csv
import json
import os
import shlex
import shutil

import matplotlib.image
import pytest

import main
from conftest import without_seconds
from server import Server
from utils import config, plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_conf(tmp_path):
    path = tmp_path / "conf.json"
    path.write_text(json.dumps({"type": "synthetic", "no_models": 4, "k": 2, "global_epochs": 2, "batch_size": 64,
                                "data_dir": str(tmp_path / "data")}))
    return str(path)


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_runs_each_value_and_draws_the_comparison(tmp_path, capsys):
    out = tmp_path / "sweep"
    status = main.main(["-c", write_conf(tmp_path), "--sweep", "prop=1.0,0.5", "--set", "seed=3", "--out", str(out)])
    assert status == 0
    for value in ("1.0", "0.5"):
        run_dir = out / f"prop={value}"
        saved = json.loads((run_dir / "config.json").read_text())
        assert saved["prop"] == float(value) and saved["seed"] == 3  # the swept value and --set both apply
        assert len(read_rows(run_dir)) == 2
    full, half = read_rows(out / "prop=1.0"), read_rows(out / "prop=0.5")
    assert int(half[0]["upload_bytes"]) < int(full[0]["upload_bytes"])
    image = matplotlib.image.imread(out / "comparison.png")
    assert image.shape[0] > 100 and image.shape[1] > 3 * image.shape[0] / 2  # three panels side by side
    # a finished sweep resumed does no more rounds; its figure is redrawn
    os.remove(out / "comparison.png")
    assert main.main(["-c", write_conf(tmp_path), "--sweep", "prop=1.0,0.5", "--set", "seed=3",
                      "--out", str(out), "--resume"]) == 0
    assert len(read_rows(out / "prop=0.5")) == 2 and (out / "comparison.png").exists()


def test_interrupted_sweep_says_how_to_finish_it(tmp_path, monkeypatch, capsys):
    out, conf = tmp_path / "sweep", write_conf(tmp_path)
    argv = ["-c", conf, "--sweep", "prop=1.0,0.5", "--out", str(out)]
    assert main.main(argv) == 0
    finished = {v: read_rows(out / f"prop={v}") for v in ("1.0", "0.5")}
    interrupted_out = tmp_path / "interrupted"
    evaluate, calls = Server.evaluate, []

    def interrupt_on_third(self, images, labels):  # two rounds of prop=1.0, then the first of prop=0.5
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(self, images, labels)
    monkeypatch.setattr(Server, "evaluate", interrupt_on_third)
    assert main.main(argv[:-1] + [str(interrupted_out)]) == 130
    monkeypatch.undo()
    command = shlex.split(capsys.readouterr().err.split("continue with:")[1])
    assert "--sweep" in command and "--resume" in command
    assert main.main(command[2:]) == 0
    for value, rows in finished.items():
        got = read_rows(interrupted_out / f"prop={value}")
        assert without_seconds(got) == without_seconds(rows)


def test_sweep_rejects_a_bad_value_before_running_anything(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main.main(["-c", write_conf(tmp_path), "--sweep", "prop=0.5,1.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prop" in err[0]
    assert not (out / "prop=0.5" / "metrics.csv").exists()


def test_sweep_refuses_zero_rounds_before_running_anything(tmp_path, capsys):
    out = tmp_path / "sweep"  # a run of no round has no metrics.csv for the figure to read
    assert main.main(["-c", write_conf(tmp_path), "--sweep", "global_epochs=0,1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "global_epochs" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("values", ["prop=0.5,0.5", "prop=0.5,1.0,0.50", "type=cifar,synthetic,cifar10"])
def test_sweep_refuses_a_value_given_twice_before_running_anything(tmp_path, capsys, values):
    out = tmp_path / "sweep"
    assert main.main(["-c", write_conf(tmp_path), "--sweep", values, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "twice" in err[0]
    assert captured.out == "" and not out.exists()


def test_table_and_labels_follow_the_runs(tmp_path, capsys):
    conf = write_conf(tmp_path)
    dirs = [str(tmp_path / name) for name in ("a", "b")]
    assert main.main(["-c", conf, "--out", dirs[0]]) == 0
    assert main.main(["-c", conf, "--set", "aggregation=mean", "--out", dirs[1]]) == 0
    assert plot.labels_for(dirs) == ["aggregation=masked_mean", "aggregation=mean"]
    capsys.readouterr()
    assert plot.main(dirs + ["--table"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for run_dir, line in zip(dirs, lines[2:]):
        rows = read_rows(run_dir)
        cells = [c.strip() for c in line.strip("|").split("|")]
        sent = sum(int(r["upload_bytes"]) for r in rows)
        dense = sum(int(r["dense_upload_bytes"]) for r in rows)
        assert float(cells[1]) == float(rows[-1]["accuracy"])
        last = [float(r["accuracy"]) for r in rows[-5:]]
        assert float(cells[2]) == round(sum(last) / len(last), 4)
        assert float(cells[3]) == max(float(r["accuracy"]) for r in rows)
        assert float(cells[4]) == round(sent / 1e6, 3)
        assert cells[5] == f"{sent / dense:.2%}"
        assert cells[6] == (f"{dense / sent:.2f}x" if dense / sent < 10 else f"{dense / sent:.0f}x")
        received = sum(int(r["download_bytes"]) for r in rows)
        assert (float(cells[7]), float(cells[8])) == (round(received / 1e6, 3), round((sent + received) / 1e6, 3))
        fewer = 2 * dense / (sent + received)  # dense FedAvg downloads what it uploads
        assert cells[9] == f"{fewer:.2f}x" and fewer < 10


def test_labels_treat_keys_missing_from_older_runs_as_defaults(tmp_path):
    conf = write_conf(tmp_path)
    dirs = [str(tmp_path / name) for name in ("a", "b")]
    assert main.main(["-c", conf, "--out", dirs[0]]) == 0
    assert main.main(["-c", conf, "--set", "residual_decay=0.5", "--out", dirs[1]]) == 0
    older = json.loads(open(os.path.join(dirs[0], "config.json")).read())
    del older["residual_decay"]  # a run made before the key existed
    open(os.path.join(dirs[0], "config.json"), "w").write(json.dumps(older))
    assert plot.labels_for(dirs) == ["residual_decay=1.0", "residual_decay=0.5"]


def test_labels_leave_out_keys_a_sparsifier_does_not_use(tmp_path):
    conf = write_conf(tmp_path)
    dirs = [str(tmp_path / name) for name in ("dense", "topk")]
    assert main.main(["-c", conf, "--set", "sparsifier=none", "--out", dirs[0]]) == 0
    assert main.main(["-c", conf, "--set", "sparsifier=topk", "--set", "prop=0.1", "--set", "mask=round",
                      "--out", dirs[1]]) == 0
    assert plot.labels_for(dirs) == ["sparsifier=none", "prop=0.1, sparsifier=topk"]


def test_plot_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert plot.main([str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    assert main.main(["-c", write_conf(base), "--out", str(base / "run")]) == 0
    return base / "run"


def copy_with_metrics(run_dir, to, edit):
    """A copy of `run_dir` whose metrics.csv, as lists of cells (the header first), went through `edit`."""
    shutil.copytree(run_dir, to)
    with open(to / "metrics.csv", newline="") as f:
        lines = list(csv.reader(f))
    with open(to / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows(edit(lines))
    return str(to)


def set_cell(column, value):
    def edit(lines):
        lines[2][lines[0].index(column)] = value
        return lines
    return edit


def extra_cell(lines):
    lines[2].append("7")
    return lines


@pytest.mark.parametrize("edit, options, words", [
    (lambda lines: lines[:1], ["--table"], "only its header"),
    (lambda lines: lines[:1], ["-o", "{tmp}/f.png"], "only its header"),
    (set_cell("accuracy", "high"), ["--table"], "'high'"),
    (set_cell("upload_bytes", ""), ["--table"], "upload_bytes"),
    (extra_cell, ["-o", "{tmp}/f.png"], "more cells than the header"),
    (None, ["-o", "{tmp}/missing/f.png"], "does not exist"),
    (None, ["-o", "{tmp}/f.xyz"], ".png"),
], ids=["header-table", "header-figure", "not-a-number", "empty-cell", "extra-cell", "missing-folder", "format"])
def test_plot_tool_refuses_bad_input_in_one_line(finished_run, tmp_path, capsys, edit, options, words):
    run_dir = copy_with_metrics(finished_run, tmp_path / "run", edit) if edit else str(finished_run)
    assert plot.main([run_dir] + [option.format(tmp=tmp_path) for option in options]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0]
    assert captured.out == "" and not any(name.startswith("f.") for name in os.listdir(tmp_path))


def test_table_of_a_run_that_uploaded_nothing(finished_run, tmp_path, capsys):
    def nothing_sent(lines):  # as when every upload of every round failed
        column = lines[0].index("upload_bytes")
        for line in lines[1:]:
            line[column] = "0"
        return lines
    run_dir = copy_with_metrics(finished_run, tmp_path / "silent", nothing_sent)
    assert plot.main([run_dir, "--table"]) == 0
    cells = [c.strip() for c in capsys.readouterr().out.strip().splitlines()[2].strip("|").split("|")]
    accuracy = [float(r["accuracy"]) for r in read_rows(run_dir)]
    assert [float(c) for c in cells[1:4]] == [accuracy[-1], round(sum(accuracy) / len(accuracy), 4), max(accuracy)]
    assert cells[4:7] == ["0.000", "0.00%", "-"]


def test_readme_documents_every_config_key():
    """The config keys table, on the topic page the README links (docs/configuration.md)."""
    page = open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8").read()
    keys = page.split("\n## Config keys\n")[1].split("\n## ")[0]
    for key, default in config.DEFAULTS.items():
        assert f"| `{key}` | `{json.dumps(default)}` |" in keys, key


def test_readme_lists_every_compression_method():
    """The methods' tables, on the topic page the README links (docs/compression.md)."""
    import codec
    page = open(os.path.join(ROOT, "docs", "compression.md"), encoding="utf-8").read()
    methods = page.split("\n## Methods\n")[1].split("\n## ")[0]
    for name in list(codec.SPARSIFIERS) + list(codec.QUANTIZERS):
        assert f"| `{name}` |" in methods, name


def test_third_panel_shows_uploaded_or_total_megabytes(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    assert main.main(["-c", write_conf(tmp_path), "--set", "prop=0.5", "--out", run_dir]) == 0
    rows = read_rows(run_dir)
    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)  # keep the figure to read its lines back
    plot.plot_runs([run_dir], str(tmp_path / "u.png"))
    plot.plot_runs([run_dir], str(tmp_path / "t.png"), bytes_shown="total")
    uploaded, total = (list(f.axes[2].lines[0].get_xdata()) for f in figures)
    expected_upload, expected_total, up, both = [], [], 0, 0
    for r in rows:
        up += int(r["upload_bytes"])
        both += int(r["upload_bytes"]) + int(r["download_bytes"])
        expected_upload.append(up / 1e6)
        expected_total.append(both / 1e6)
    assert uploaded == expected_upload and total == expected_total
    assert int(rows[0]["total_bytes"]) == int(rows[0]["upload_bytes"]) + int(rows[0]["download_bytes"])
    assert figures[1].axes[2].get_xlabel().startswith("Uploaded + downloaded MB")


def test_labels_can_be_given(tmp_path, capsys):
    conf = write_conf(tmp_path)
    dirs = [str(tmp_path / name) for name in ("a", "b")]
    for run_dir in dirs:
        assert main.main(["-c", conf, "--out", run_dir]) == 0
    capsys.readouterr()
    assert plot.main(dirs + ["--table", "--labels", "dense,STC 1%"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].startswith("| dense |") and lines[3].startswith("| STC 1% |")
    assert plot.main(dirs + ["--table", "--labels", "only-one"]) == 2
    assert "--labels names 1 runs" in capsys.readouterr().err


def test_labels_leave_out_defaults_when_something_else_differs(tmp_path):
    conf = write_conf(tmp_path)
    dirs = [str(tmp_path / name) for name in ("dense", "stc")]
    assert main.main(["-c", conf, "--set", "sparsifier=none", "--out", dirs[0]]) == 0
    assert main.main(["-c", conf, "--set", "sparsifier=topk", "--set", "quantize=ternary", "--set", "prop=0.1",
                      "--set", "error_feedback=true", "--out", dirs[1]]) == 0
    assert plot.labels_for(dirs) == ["sparsifier=none", "prop=0.1, sparsifier=topk, quantize=ternary, "
                                                        "error_feedback=True"]


def test_robust_grid_table_and_figure(tmp_path, capsys):
    """figures/robust.py: final and last-5 accuracy of finished runs, computed here by hand; unfinished runs blank."""
    import figures.robust as robust_figure

    def write(name, accuracies):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        lines = ["round,accuracy"] + [f"{i + 1},{a}" for i, a in enumerate(accuracies)]
        (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    write("k5/dense/honest-none", [0.5] * 4 + [0.6, 0.7, 0.8, 0.9, 0.95, 1.0])
    write("k5/dense/boost100-none", [0.1] * 10)
    write("k2/stc0.04/noise100-median", [0.3] * 9)  # 9 of 10 rounds: unfinished
    robust_figure.main([str(tmp_path / "runs"), "--rounds", "10", "-o", str(tmp_path / "grid.png")])
    out, err = capsys.readouterr()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line.split("|")[4:9] for line in out.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["5", "dense", "honest"][0].strip() == "1.0000 / 0.8700"  # (0.7 + 0.8 + 0.9 + 0.95 + 1.0) / 5
    assert rows["5", "dense", "1 booster (100x)"][0].strip() == "0.1000 / 0.1000"
    assert rows["5", "dense", "honest"][1].strip() == "not run"
    assert rows["2", "STC 4%", "1 noise (100 std)"][2].strip() == "not run"
    assert "k2/stc0.04/noise100-median (missing or unfinished)" in err
    assert (tmp_path / "grid.png").stat().st_size > 10_000


def test_coverage_reads_a_finished_runs_checkpoint(make_conf, tmp_path, capsys):
    """figures/coverage.py: the residual norms it prints are those in the checkpoint, and a run whose top-k sent a few
    entries per round moved only part of the model."""
    import federation
    import figures.coverage as coverage
    import torch
    from conftest import kept_records
    from engines.inprocess import InProcess
    conf = make_conf(sparsifier="topk", topk_scope="model", prop=0.01, error_feedback=True, global_epochs=2)
    federation.run(conf, str(tmp_path / "run"), False, InProcess)
    capsys.readouterr()
    coverage.main([str(tmp_path / "run")])
    line = capsys.readouterr().out.strip()
    residuals = kept_records(tmp_path / "run")["residual"]
    norms = sorted(float(torch.cat(r).norm()) for r in residuals.values())
    assert line.endswith("residual norms " + " ".join(f"{n:.2f}" for n in norms)) and len(norms) >= 2
    moved = float(line.split("entries moved ")[1].split("%")[0])
    assert 0 < moved <= 2 * 2 * 1.0 + 0.1  # 2 rounds of at most 2 clients' 1% (plus rounding of the print)


def test_lowrank_shares_by_hand():
    """figures/lowrank.py: a rank-r share from singular values 3, 2, 1 (squares 9, 4, 1), and one power step keeps all
    of an exactly rank-1 matrix whatever the start."""
    import numpy as np
    import figures.lowrank as lowrank
    assert lowrank.kept_share(np.array([3.0, 2.0, 1.0]), 1) == pytest.approx(9 / 14)
    assert lowrank.kept_share(np.array([3.0, 2.0, 1.0]), 2) == pytest.approx(13 / 14)
    rank_one = np.outer([1.0, -2.0, 0.5], [3.0, 0.0, 1.0, 2.0])
    assert lowrank.power_step_share(rank_one, 1, np.random.default_rng(5)) == pytest.approx(1.0)
    diagonal = np.diag([2.0, 1.0])  # a start along (1, 0) would keep 4/5; a random one keeps between 0 and 1
    assert 0 < lowrank.power_step_share(diagonal, 1, np.random.default_rng(5)) < 1
