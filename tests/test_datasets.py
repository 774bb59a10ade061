"""datasets.py: where data is found, how IDX files are read, bad data, batches and CIFAR's augmentation."""
import gzip
import os
import struct

import pytest
import torch
import torch.nn.functional as F

import datasets
import main


def write_idx(path, array, compress):
    """An IDX file of unsigned bytes, written from the format's definition (big-endian sizes after a magic)."""
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.numpy().tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def fake_idx_dir(directory, compress=True, train=12, test=6, seed=0):
    """Random 28x28 images and labels in the four MNIST-format files; returns the raw tensors."""
    os.makedirs(directory, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    raw = {}
    for split, count in (("train", train), ("test", test)):
        images = torch.randint(0, 256, (count, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        image_name, label_name = datasets.IDX_NAMES[split]
        suffix = ".gz" if compress else ""
        write_idx(os.path.join(directory, image_name + suffix), images, compress)
        write_idx(os.path.join(directory, label_name + suffix), labels, compress)
        raw[split] = (images, labels)
    return raw


def normalized(images, name):
    (mean,), (std,) = datasets.NORMALIZATION[name]
    return ((images.float() / 255 - mean) / std).unsqueeze(1)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_in_data_dir_come_first(tmp_path, offline, compress):
    raw = fake_idx_dir(tmp_path / "fashion-mnist", compress)
    data = datasets.load("fashion-mnist", str(tmp_path), "cpu")
    assert data.source == str(tmp_path / "fashion-mnist")  # before /usr/share/datasets/fashion-mnist
    assert torch.equal(data.train_images, normalized(raw["train"][0], "fashion-mnist"))
    assert torch.equal(data.test_labels, raw["test"][1].long())
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10 and not data.augment


def test_torchvision_layout_is_read_without_downloading(tmp_path, offline):
    raw = fake_idx_dir(tmp_path / "MNIST" / "raw", compress=False)  # what torchvision leaves after a download
    data = datasets.load("mnist", str(tmp_path), "cpu")
    assert data.source == str(tmp_path)
    assert torch.equal(data.train_images, normalized(raw["train"][0], "mnist"))
    assert torch.equal(data.train_labels, raw["train"][1].long())


def test_missing_data_names_every_place_looked(tmp_path, offline):
    with pytest.raises(datasets.DataError) as error:
        datasets.load("mnist", str(tmp_path), "cpu")
    message = str(error.value)
    for place in (str(tmp_path), str(tmp_path / "mnist"), "/usr/share/datasets/mnist", "no internet in this test"):
        assert place in message
    assert "To get it" in message


def test_damaged_idx_file_is_a_clear_error_with_status_2(tmp_path, offline, capsys):
    fake_idx_dir(tmp_path / "fashion-mnist")
    path = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        content = f.read()
    with gzip.open(path, "wb") as f:
        f.write(content[:-100])
    conf = tmp_path / "conf.json"
    conf.write_text(f'{{"type": "fashion-mnist", "data_dir": "{tmp_path}", "global_epochs": 1}}')
    status = main.main(["-c", str(conf), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "truncated" in err[0] and str(path) in err[0]


def test_not_an_idx_file(tmp_path, offline):
    fake_idx_dir(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(datasets.DataError, match="not an IDX file"):
        datasets.load("mnist", str(tmp_path), "cpu")


def test_train_batches_cover_the_share_once_in_seeded_order(tmp_path):
    data = datasets.load("synthetic", str(tmp_path), "cpu")
    share = torch.tensor([5, 17, 2, 99, 40, 41, 7])
    seen = []
    for images, labels in data.train_batches(share, 3, torch.Generator().manual_seed(1)):
        assert len(images) == len(labels) <= 3
        for image, label in zip(images, labels):
            index = next(i for i in share.tolist() if torch.equal(data.train_images[i], image))
            assert data.train_labels[index] == label
            seen.append(index)
    assert sorted(seen) == sorted(share.tolist())
    again = [i for images, _ in data.train_batches(share, 3, torch.Generator().manual_seed(1)) for i in images]
    assert torch.equal(torch.stack(again), data.train_images[seen])


def test_crop_and_flip_matches_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)
    pad_value = torch.tensor([-1.0, -2.0, -3.0])
    data = datasets.Dataset("cifar", images, torch.zeros(6, dtype=torch.long), images, torch.zeros(6),
                            num_classes=10, augment=True, pad_value=pad_value, source="test")
    out = data._crop_and_flip(images, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)  # the same draws, in the same order
    top, left = torch.randint(0, 9, (6,), generator=draws), torch.randint(0, 9, (6,), generator=draws)
    flip = torch.rand(6, generator=draws) < 0.5
    for i in range(6):
        padded = torch.stack([F.pad(images[i, c], (4, 4, 4, 4), value=float(pad_value[c])) for c in range(3)])
        expected = padded[:, top[i]:top[i] + 32, left[i]:left[i] + 32]
        if flip[i]:
            expected = expected.flip(2)
        assert torch.equal(out[i], expected)
    assert flip.any() and not flip.all()  # both branches were exercised


def test_synthetic_is_deterministic(tmp_path):
    a, b = datasets.load("synthetic", str(tmp_path), "cpu"), datasets.load("synthetic", str(tmp_path), "cpu")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.image_shape == datasets.SYNTHETIC_SHAPE and a.num_classes == 10
    assert len(a.train_labels) == datasets.SYNTHETIC_SIZES["train"]
