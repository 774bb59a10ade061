"""A short run on the real Fashion-MNIST (the Debian package's files, found offline by datasets.load)."""
import json

import torch

import datasets
from conftest import read_csv
from main import main


def test_fashion_mnist_loads_normalized():
    data = datasets.load("fashion-mnist", "/nonexistent-data-dir", torch.device("cpu"))
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train_labels) == 60000 and len(data.test_labels) == 10000
    assert torch.equal(torch.bincount(data.train_labels), torch.full((10,), 6000))
    # normalized with the training set's mean and std
    assert abs(data.train_inputs.mean().item()) < 0.01 and abs(data.train_inputs.std().item() - 1) < 0.01


def test_short_fashion_mnist_run_learns(tmp_path):
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps({"type": "fashion-mnist", "model_name": "cnn", "no_models": 10, "k": 2,
                                "global_epochs": 2, "local_epochs": 1, "data_dir": str(tmp_path / "data")}))
    out = tmp_path / "run"
    assert main(["-c", str(conf), "--out", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 2
    assert float(rows[-1]["accuracy"]) > 0.6  # chance is 0.1
    assert float(rows[-1]["upload_bytes"]) < float(rows[-1]["dense_upload_bytes"])  # default prop 0.6
