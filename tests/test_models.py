"""models.py: the small CNN and the adapted torchvision models, for both image shapes; pretrained weights offline."""
import json

import pytest
import torch
import torchvision

import models
from conftest import read_csv
from main import main


@pytest.mark.parametrize("name", ["cnn", "resnet18", "vgg11"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_models_fit_small_images(name, shape):
    model = models.build(name, shape, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == shape[0] and first_conv.kernel_size == (3, 3) and first_conv.stride == (1, 1)
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_resnet_keeps_full_resolution_into_its_first_block():
    model = models.build("resnet18", (3, 32, 32), 10).eval()
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = output.shape
    model.layer1.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen["shape"][-2:] == (32, 32)  # ImageNet's stem would have left 8x8


def test_pretrained_weights_that_cannot_be_fetched_are_a_clear_error(monkeypatch):
    def offline(name, weights=None):
        assert weights == "DEFAULT"
        raise RuntimeError("<urlopen error no internet>")
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(models.ModelError, match="cannot fetch pretrained weights for resnet18"):
        models.build("resnet18", (3, 32, 32), 10, pretrained=True)


def test_a_resnet_with_batchnorm_runs_end_to_end(tmp_path):
    """BatchNorm's running statistics travel like weights; its integer counter stays on the server."""
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps({"type": "synthetic", "model_name": "resnet18", "no_models": 20, "k": 2,
                                "global_epochs": 1, "batch_size": 50, "prop": 0.5, "data_dir": str(tmp_path)}))
    assert main(["-c", str(conf), "--out", str(tmp_path / "run")]) == 0
    row = read_csv(tmp_path / "run" / "metrics.csv")[0]
    model = models.build("resnet18", (1, 16, 16), 10)
    floats = sum(t.numel() for t in model.state_dict().values() if torch.is_floating_point(t))
    assert float(row["upload_fraction"]) == pytest.approx(0.5, abs=0.01)
    assert int(row["dense_upload_bytes"]) == 2 * (11 + 4 * floats)  # header + 4 bytes per floating entry
