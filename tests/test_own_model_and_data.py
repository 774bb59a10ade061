"""A user's own model and data ("package.module:function"), natural partitions, other class counts, the example."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import datasets
import main
import models
from conftest import ROOT, read_csv, without_seconds
from test_datasets import write_mnist_like
from utils import partition

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}

# a lab's own task, in a package outside the project: token sequences (integers, not images) of 5 classes, the class
# given by which token is most frequent, written by 6 named users
LAB_TASK = '''
import torch
from torch import nn


def data():
    g = torch.Generator().manual_seed(0)

    def sequences(count):
        labels = torch.randint(0, 5, (count,), generator=g)
        tokens = torch.randint(0, 20, (count, 12), generator=g)
        tokens[:, :6] = labels[:, None] * 4 + torch.randint(0, 4, (count, 6), generator=g)
        return tokens, labels

    train_inputs, train_labels = sequences(240)
    test_inputs, test_labels = sequences(60)
    users = torch.tensor([101, 7, 33, 2024, 5, 64])
    return {"train_inputs": train_inputs, "train_labels": train_labels, "test_inputs": test_inputs,
            "test_labels": test_labels, "num_classes": 5, "train_clients": users[torch.arange(240) % 6]}


class BagOfTokens(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def model(input_shape, num_classes):
    return BagOfTokens(input_shape, num_classes)


def not_a_model(input_shape, num_classes):
    return {"weights": torch.zeros(3)}


def flat(input_shape, num_classes):
    return nn.Flatten()


def for_images(input_shape, num_classes):
    return nn.Conv2d(1, num_classes, 3)


class FirstOnly(BagOfTokens):
    def forward(self, tokens):  # right for one example, wrong for a batch
        return super().forward(tokens)[:1]


class Integers(BagOfTokens):
    def forward(self, tokens):
        return super().forward(tokens).long()


def integers(input_shape, num_classes):
    return Integers(input_shape, num_classes)


class Detached(BagOfTokens):
    def forward(self, tokens):
        return super().forward(tokens).detach()


def first_only(input_shape, num_classes):
    return FirstOnly(input_shape, num_classes)


def detached(input_shape, num_classes):
    return Detached(input_shape, num_classes)


def half(input_shape, num_classes):
    return BagOfTokens(input_shape, num_classes).half()


def lazy(input_shape, num_classes):
    return nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.LazyLinear(num_classes))


def exits(input_shape, num_classes):
    import sys
    sys.exit(0)


def small_vocabulary(input_shape, num_classes):  # the data's tokens run to 19: the first batch with one past 9 fails
    return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(4 * input_shape[0], num_classes))
'''
LAB_CONF = {"model_name": "lab.task:model", "type": "lab.task:data", "partition": "natural", "no_models": 6, "k": 3,
            "global_epochs": 3, "local_epochs": 2, "batch_size": 16, "lr": 0.3, "server_validation": 30,
            "sparsifier": "topk", "prop": 0.2, "error_feedback": True, "download": "compressed"}


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A folder outside the project holding the package `lab`, as the working directory; the module is forgotten
    afterwards, so that tests that write another `lab` import theirs."""
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "__init__.py").write_text("")
    (tmp_path / "lab" / "task.py").write_text(LAB_TASK)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in ("lab", "lab.task", "lab.bad", "lab.arrays"):
        sys.modules.pop(name, None)


def write(folder, conf):
    path = folder / "conf.json"
    path.write_text(json.dumps(conf))
    return str(path)


def test_own_model_and_data_run_in_process_and_on_flower_with_identical_metrics(lab):
    conf = write(lab, LAB_CONF)
    assert main.main(["-c", conf, "--out", str(lab / "inprocess")]) == 0
    flower = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "-c", conf, "--out", str(lab / "flower"),
                             "--engine", "flower"], cwd=lab, env=ENV, capture_output=True, text=True, timeout=600)
    assert flower.returncode == 0, flower.stderr[-3000:]
    in_process = without_seconds(read_csv(lab / "inprocess" / "metrics.csv"))
    assert in_process == without_seconds(read_csv(lab / "flower" / "metrics.csv"))
    accuracy = [float(row["accuracy"]) for row in in_process]
    assert accuracy[-1] > 0.5  # 5 classes: a guess gets 0.2; the most frequent token tells the class
    # the compressed download and top-k upload both ran on a model of integer inputs
    assert all(0 < int(row["upload_bytes"]) < int(row["dense_upload_bytes"]) for row in in_process)


def test_natural_partition_gives_each_named_user_their_examples(lab):
    conf = {**LAB_CONF, "server_validation": 30, "seed": 3}
    data = datasets.load(conf["type"], "unused", "cpu")
    validation, shares = partition.server_and_clients(data, conf)
    users = [101, 7, 33, 2024, 5, 64]
    held = set(validation.tolist())
    for client, user in enumerate(sorted(users)):  # clients in the order of the users' ids
        examples = [i for i in range(240) if users[i % 6] == user and i not in held]
        assert shares[client].tolist() == examples
    assert len(held) == 30 and sum(map(len, shares)) == 210


@pytest.mark.parametrize("change, message", [
    ({"no_models": 5, "k": 2}, "partition 'natural': the data names 6 clients; set no_models to 6"),
    ({"server_validation": 235}, "server_validation 235 leaves 5 of the 240 training examples for 6 clients"),
    ({"type": "synthetic"}, "partition 'natural' needs data that names a client per training example"),
])
def test_natural_partition_refusals(lab, capsys, change, message):
    assert main.main(["-c", write(lab, {**LAB_CONF, **change}), "--out", str(lab / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (lab / "run").exists()


def test_natural_partition_refuses_a_client_left_without_examples():
    owners = torch.tensor([0, 1, 2, 1, 2, 0, 1])
    assert [s.tolist() for s in partition.natural(owners, 3, torch.tensor([1, 6]))] == [[0, 5], [3], [2, 4]]
    with pytest.raises(partition.PartitionError, match="server_validation leaves client 1 no training example"):
        partition.natural(owners, 3, torch.tensor([1, 3, 6]))


BAD_DATA = [  # (the body of data(), what the one line says)
    ("return [1, 2]", "returned list; it must return a dict with train_inputs"),
    ("d = good(); del d['test_labels']; return d", "returned a dict without test_labels"),
    ("d = good(); d['labels'] = 1; return d", "unknown keys labels"),
    ("d = good(); d['num_classes'] = True; return d", "num_classes must be a whole number from 2"),
    ("d = good(); d['num_classes'] = 1; return d", "num_classes must be a whole number from 2"),
    ("d = good(); d['num_classes'] = 2; return d", "train_labels run from 0 to 3; expected 0 to 1"),
    ("d = good(); d['train_labels'] = d['train_labels'].float(); return d", "train_labels must be a 1-D tensor of int"),
    ("d = good(); d['train_labels'] = d['train_labels'][:-1]; return d", "train_labels has 39 entries for 40"),
    ("d = good(); d['train_inputs'][3, 1] = float('nan'); return d", "train_inputs holds values that are not finite"),
    ("d = good(); d['test_inputs'] = d['test_inputs'][:, :3]; return d", "test_inputs are torch.float32 of shape (3,)"),
    ("d = good(); d['train_inputs'] = d['train_inputs'][:, 0]; return d", "at least one example of at least one value"),
    ("d = good(); d['train_inputs'] = 'abc'; return d", "train_inputs must be a torch tensor or a numpy array, got"),
    ("d = good(); d['train_inputs'] = d['train_inputs'].numpy().astype(str); return d", "numpy array of <U"),
    ("d = good(); d['train_clients'] = torch.zeros(7, dtype=torch.long); return d", "train_clients has 7 entries"),
    ("raise ValueError('no such file: /data/x.csv')", "raised ValueError: no such file: /data/x.csv at bad.py:"),
    ("import sys; sys.exit(0)", "raised SystemExit: 0 at bad.py:"),
    ("d = good(); d['train_inputs'] = d['train_inputs'][:, :0]; return d", "at least one example of at least one"),
    ("d = good(); d['train_inputs'] = d['train_inputs'].to_sparse(); return d",
     "must be a dense tensor with its values (not sparse, nested, quantized"),
    ("import numpy; d = good(); d['train_labels'] = numpy.full(40, 2**64 - 1, dtype=numpy.uint64); return d",
     "train_labels holds values past 2^63 - 1"),
]


@pytest.mark.parametrize("body, message", BAD_DATA)
def test_bad_data_of_ones_own_is_one_line_and_status_2(lab, capsys, body, message):
    (lab / "lab" / "bad.py").write_text(textwrap.dedent(f'''
        import torch

        def good():
            g = torch.Generator().manual_seed(0)
            return {{"train_inputs": torch.randn(40, 6, generator=g), "train_labels": torch.arange(40) % 4,
                    "test_inputs": torch.randn(10, 6, generator=g), "test_labels": torch.arange(10) % 4,
                    "num_classes": 4}}

        def data():
            {body}
        '''))
    conf = write(lab, {"type": "lab.bad:data", "model_name": "lab.task:model", "no_models": 2, "k": 1,
                       "server_validation": 0, "global_epochs": 1})
    assert main.main(["-c", conf, "--out", str(lab / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "type 'lab.bad:data'" in error and message in error, error


def test_the_good_data_above_runs(lab):
    """Control for the refusals above: their unchanged data, with a model for its inputs, runs."""
    (lab / "lab" / "bad.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        def data():
            g = torch.Generator().manual_seed(0)
            return {"train_inputs": torch.randn(40, 6, generator=g), "train_labels": torch.arange(40) % 4,
                    "test_inputs": torch.randn(10, 6, generator=g), "test_labels": torch.arange(10) % 4,
                    "num_classes": 4}

        def linear(input_shape, num_classes):
            return nn.Linear(input_shape[0], num_classes)
        '''))
    conf = write(lab, {"type": "lab.bad:data", "model_name": "lab.bad:linear", "no_models": 2, "k": 1,
                       "server_validation": 0, "global_epochs": 1})
    assert main.main(["-c", conf, "--out", str(lab / "run")]) == 0


@pytest.mark.parametrize("model_name, message", [
    ("lab.missing:model", "cannot import lab.missing (ModuleNotFoundError"),
    ("lab.task:nothing", "lab.task has no function nothing"),
    ("lab.task:data", "'lab.task:data' raised TypeError: data() takes 0 positional arguments but 2 were given"),
    ("lab.task:not_a_model", "returned dict, not a torch.nn.Module"),
    ("lab.task", "unknown model_name 'lab.task'"),
    ("lab.task:", "names your own function as package.module:function"),
    ("lab.task:flat", "model lab.task:flat has no floating-point parameters to train"),
    ("lab.task:integers", "must return floating-point (batch, 5) logits for inputs of shape 12; for a batch of 2 it "
                          "returned torch.int64 of shape (2, 5)"),
    ("lab.task:for_images", "model lab.task:for_images cannot take inputs of shape 12: RuntimeError"),
    ("lab.task:first_only", "for a batch of 2 it returned torch.float32 of shape (1, 5)"),
    ("lab.task:detached", "returns logits that no parameter's gradient reaches"),
    ("lab.task:half", "has parameters or buffers of torch.float16: its floating-point state must be float32 or"),
    ("lab.task:lazy", "has lazy (uninitialized) parameters"),
    ("lab.task:exits", "model_name 'lab.task:exits' raised SystemExit: 0 at task.py:"),
    ("models:small_cnn", "models is one of fedsparse's own modules; give yours another name"),
    ("main:main", "main is one of fedsparse's own modules"),
    ("lab.task:small_vocabulary", "the run failed in training or evaluation, with model_name and type of your "
                                  "own (lab.task:small_vocabulary, lab.task:data): IndexError: index out of range in "
                                  "self"),
])
def test_bad_model_of_ones_own_is_one_line_and_status_2(lab, capsys, model_name, message):
    assert main.main(["-c", write(lab, {**LAB_CONF, "model_name": model_name}), "--out", str(lab / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error


def test_numpy_arrays_of_either_byte_order_and_read_only_are_read_as_their_values(lab):
    (lab / "lab" / "arrays.py").write_text(textwrap.dedent('''
        import numpy as np

        def data():
            inputs = np.arange(48, dtype=">f4").reshape(8, 6)  # big-endian, as a file written elsewhere may hold
            inputs.flags.writeable = False
            return {"train_inputs": inputs, "train_labels": np.arange(8, dtype=np.uint8) % 3,
                    "test_inputs": np.ones((2, 6), dtype=np.float64), "test_labels": np.array([0, 2]),
                    "num_classes": 3, "train_clients": np.array([5, 5, 9, 9, 9, 1, 1, 1])}
        '''))
    data = datasets.load("lab.arrays:data", "unused", "cpu")
    assert data.train_inputs.tolist() == [[6.0 * row + col for col in range(6)] for row in range(8)]
    assert data.train_labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1] and data.test_inputs.dtype == torch.float32
    assert data.train_clients.tolist() == [1, 1, 2, 2, 2, 0, 0, 0]  # ids 1, 5, 9 in increasing order
    assert data.source == os.path.join("lab", "arrays.py")
    sys.modules.pop("lab.arrays", None)


def test_resume_refuses_data_that_changed(lab, capsys):
    conf = write(lab, {**LAB_CONF, "global_epochs": 1})
    assert main.main(["-c", conf, "--out", str(lab / "run")]) == 0
    (lab / "lab" / "task.py").write_text(LAB_TASK.replace("manual_seed(0)", "manual_seed(1)"))
    sys.modules.pop("lab.task", None)
    assert main.main(["--out", str(lab / "run"), "--resume", "--set", "global_epochs=2"]) == 2
    assert "its data (lab.task:data) changed since the run started" in capsys.readouterr().err


def test_pretrained_is_refused_for_a_model_of_ones_own(lab):
    with pytest.raises(models.ModelError, match="pretrained applies to torchvision's models only"):
        models.build("lab.task:model", (12,), 5, pretrained=True, input_dtype=torch.int64)


def test_a_built_in_image_model_refuses_inputs_that_are_not_images(lab, capsys):
    assert main.main(["-c", write(lab, {**LAB_CONF, "model_name": "cnn"}), "--out", str(lab / "run")]) == 2
    assert "model cnn takes images (channels, height, width); the data's inputs have shape 12" in \
        capsys.readouterr().err


def test_47_classes_end_to_end_with_stc_uploads_and_compressed_downloads(tmp_path, offline):
    write_mnist_like(tmp_path / "EMNIST" / "raw", "emnist-balanced-", {"train": 470, "test": 94}, 47)
    conf = write(tmp_path, {"type": "emnist", "data_dir": str(tmp_path), "no_models": 5, "k": 2, "global_epochs": 2,
                            "server_validation": 47, "sparsifier": "topk", "topk_scope": "model",
                            "quantize": "ternary", "prop": 0.04, "error_feedback": True, "aggregation": "mean",
                            "download": "compressed"})
    assert main.main(["-c", conf, "--out", str(tmp_path / "run")]) == 0
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 2 and all(np.isfinite(float(row["loss"])) for row in rows)
    # the head has 47 outputs: the dense model is the CNN's with a 128 x 47 last layer (f32, and a header each)
    dense = (32 * 9 + 32 + 64 * 32 * 9 + 64 + 64 * 7 * 7 * 128 + 128 + 128 * 47 + 47) * 4
    assert 2 * dense < int(rows[0]["dense_upload_bytes"]) < 2 * dense + 2 * 64
    assert all(int(row["upload_bytes"]) < int(row["dense_upload_bytes"]) / 20 for row in rows)
    assert int(rows[1]["download_bytes"]) < 2 * dense / 5  # the second round's syncs are coded steps


def test_the_example_runs_from_the_projects_folder(tmp_path):
    """examples/tabular.json, as its page runs it, for 3 rounds."""
    result = subprocess.run([sys.executable, "main.py", "-c", "examples/tabular.json", "--set", "global_epochs=3",
                             "--out", str(tmp_path / "run")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "partition natural: 20 clients" in result.stdout
    accuracy = [float(row["accuracy"]) for row in read_csv(tmp_path / "run" / "metrics.csv")]
    assert accuracy[-1] > accuracy[0] and accuracy[-1] > 0.6  # three classes: the largest is 43% of the test set


@pytest.mark.parametrize("method", [
    {"sparsifier": "random", "mask": "round"},
    {"sparsifier": "hybrid", "prop": 0.1, "quantize": "int8"},
    {"sparsifier": "none", "quantize": "qsgd", "defense": "median"},
    {"sparsifier": "powersgd", "rank": 1, "error_feedback": True, "download": "relay"},
])
def test_every_kind_of_codec_download_and_defense_runs_on_a_model_of_ones_own(lab, method):
    conf = write(lab, {**LAB_CONF, "global_epochs": 2, **method,
                       **({"error_feedback": False} if method["sparsifier"] == "random" else {})})
    assert main.main(["-c", conf, "--out", str(lab / "run")]) == 0
    rows = read_csv(lab / "run" / "metrics.csv")
    assert len(rows) == 2 and all(0 < int(row["upload_bytes"]) < int(row["dense_upload_bytes"]) for row in rows)


def test_a_run_of_ones_own_resumes_exactly(lab):
    conf = write(lab, LAB_CONF)
    assert main.main(["-c", conf, "--out", str(lab / "straight")]) == 0
    assert main.main(["-c", conf, "--set", "global_epochs=2", "--out", str(lab / "resumed")]) == 0
    assert main.main(["--out", str(lab / "resumed"), "--resume", "--set", "global_epochs=3"]) == 0
    assert without_seconds(read_csv(lab / "resumed" / "metrics.csv")) == \
        without_seconds(read_csv(lab / "straight" / "metrics.csv"))
