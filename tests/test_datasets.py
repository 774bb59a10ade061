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
    (mean,), (std,) = datasets.BUILTINS[name].mean, datasets.BUILTINS[name].std
    return ((images.float() / 255 - mean) / std).unsqueeze(1)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_in_data_dir_come_first(tmp_path, offline, compress):
    raw = fake_idx_dir(tmp_path / "fashion-mnist", compress)
    data = datasets.load("fashion-mnist", str(tmp_path), "cpu")
    assert data.source == str(tmp_path / "fashion-mnist")  # before /usr/share/datasets/fashion-mnist
    assert torch.equal(data.train_inputs, normalized(raw["train"][0], "fashion-mnist"))
    assert torch.equal(data.test_labels, raw["test"][1].long())
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10 and not data.augment


def test_torchvision_layout_is_read_without_downloading(tmp_path, offline):
    raw = fake_idx_dir(tmp_path / "MNIST" / "raw", compress=False)  # what torchvision leaves after a download
    data = datasets.load("mnist", str(tmp_path), "cpu")
    assert data.source == str(tmp_path)
    assert torch.equal(data.train_inputs, normalized(raw["train"][0], "mnist"))
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
            index = next(i for i in share.tolist() if torch.equal(data.train_inputs[i], image))
            assert data.train_labels[index] == label
            seen.append(index)
    assert sorted(seen) == sorted(share.tolist())
    again = [i for images, _ in data.train_batches(share, 3, torch.Generator().manual_seed(1)) for i in images]
    assert torch.equal(torch.stack(again), data.train_inputs[seen])


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
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(a.test_labels, b.test_labels)
    assert a.input_shape == datasets.SYNTHETIC_SHAPE and a.num_classes == 10 and a.train_clients is None
    assert len(a.train_labels) == datasets.SYNTHETIC_SIZES["train"]


# ---- the other built-in datasets, from small files in the formats torchvision reads -----------------------------

@pytest.fixture
def fixture_checksums(monkeypatch):
    """torchvision checks CIFAR's and SVHN's files against the MD5 of the real downloads, which a fixture cannot
    match: here a file passes when it exists. Everything else (the formats, the reading) is torchvision's own."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn):
        monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def random_images(count, shape, seed):
    return torch.randint(0, 256, (count, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def expected(images, name):
    """Normalized float images, by the formula, with the channel statistics written out here."""
    stats = {"kmnist": ([0.1918], [0.3483]), "emnist": ([0.1751], [0.3332]),
             "cifar": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
             "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
             "svhn": ([0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970])}
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in stats[name])
    return (images.float() / 255 - mean) / std


def write_mnist_like(raw_dir, prefix, labels_per_split, classes, seed=0):
    """IDX files as torchvision's MNIST-family classes keep them after a download (uncompressed, in <Name>/raw)."""
    os.makedirs(raw_dir, exist_ok=True)
    raw = {}
    for split, count in labels_per_split.items():
        images = random_images(count, (28, 28), seed + (split == "test"))
        labels = (torch.arange(count) % classes).to(torch.uint8)
        part = "train" if split == "train" else ("test" if prefix else "t10k")
        write_idx(os.path.join(raw_dir, f"{prefix}{part}-images-idx3-ubyte"), images, compress=False)
        write_idx(os.path.join(raw_dir, f"{prefix}{part}-labels-idx1-ubyte"), labels, compress=False)
        raw[split] = (images.unsqueeze(1), labels.long())
    return raw


def write_cifar(folder, files, label_key, counts, classes, meta, seed=0):
    """CIFAR's python batches: pickled dicts of uint8 rows (3 x 32 x 32, channel-major) and a list of labels."""
    import pickle
    os.makedirs(folder, exist_ok=True)
    rows, labels = [], []
    for i, (name, count) in enumerate(zip(files, counts)):
        data = random_images(count, (3 * 32 * 32,), seed + i)
        batch_labels = [(i * 7 + j) % classes for j in range(count)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data.numpy(), label_key: batch_labels}, f)
        rows.append(data)
        labels.append(torch.tensor(batch_labels))
    with open(os.path.join(folder, meta[0]), "wb") as f:
        pickle.dump({meta[1]: [f"class {c}" for c in range(classes)]}, f)
    return torch.cat(rows).view(-1, 3, 32, 32), torch.cat(labels)


def test_kmnist_from_torchvision_files(tmp_path, offline):
    raw = write_mnist_like(tmp_path / "KMNIST" / "raw", "", {"train": 12, "test": 6}, 10)
    data = datasets.load("kmnist", str(tmp_path), "cpu")
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28) and not data.augment
    assert torch.equal(data.train_inputs, expected(raw["train"][0], "kmnist"))
    assert torch.equal(data.test_labels, raw["test"][1])


def test_emnist_balanced_has_47_classes(tmp_path, offline):
    raw = write_mnist_like(tmp_path / "EMNIST" / "raw", "emnist-balanced-", {"train": 94, "test": 47}, 47)
    data = datasets.load("emnist", str(tmp_path), "cpu")
    assert data.num_classes == 47 and int(data.train_labels.max()) == 46
    assert torch.equal(data.train_inputs, expected(raw["train"][0], "emnist"))
    assert torch.equal(data.test_labels, raw["test"][1])


def test_a_label_past_the_datasets_classes_is_refused(tmp_path, offline):
    write_mnist_like(tmp_path / "EMNIST" / "raw", "emnist-balanced-", {"train": 60, "test": 48}, 48)
    with pytest.raises(datasets.DataError, match="train labels of emnist .* run from 0 to 47; expected 0 to 46"):
        datasets.load("emnist", str(tmp_path), "cpu")


@pytest.mark.parametrize("name", ["cifar", "cifar100"])
def test_cifar_batches(tmp_path, offline, fixture_checksums, name):
    if name == "cifar":
        folder, classes = tmp_path / "cifar-10-batches-py", 10
        train = write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)], "labels", [3, 2, 2, 2, 3], classes,
                            ("batches.meta", "label_names"))
        test = write_cifar(folder, ["test_batch"], "labels", [4], classes, ("batches.meta", "label_names"), seed=9)
    else:
        folder, classes = tmp_path / "cifar-100-python", 100
        train = write_cifar(folder, ["train"], "fine_labels", [12], classes, ("meta", "fine_label_names"))
        test = write_cifar(folder, ["test"], "fine_labels", [5], classes, ("meta", "fine_label_names"), seed=9)
    data = datasets.load(name, str(tmp_path), "cpu")
    assert data.num_classes == classes and data.input_shape == (3, 32, 32) and data.augment
    assert torch.equal(data.train_inputs, expected(train[0], name)) and torch.equal(data.train_labels, train[1])
    assert torch.equal(data.test_inputs, expected(test[0], name)) and torch.equal(data.test_labels, test[1])


def test_svhn_from_its_mat_files(tmp_path, offline, fixture_checksums):
    import numpy as np
    import scipy.io
    folder = tmp_path / "svhn"
    os.makedirs(folder)
    written = {}
    for split, count in (("train", 7), ("test", 3)):
        images = random_images(count, (32, 32, 3), count).numpy()  # the .mat holds X as (height, width, channel, N)
        digits = np.arange(1, count + 1).reshape(-1, 1)  # SVHN writes the digit 0 as the label 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": np.moveaxis(images, 0, -1), "y": digits})
        written[split] = (torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(digits[:, 0] % 10))
    data = datasets.load("svhn", str(tmp_path), "cpu")
    assert data.num_classes == 10 and not data.augment
    assert torch.equal(data.train_inputs, expected(written["train"][0], "svhn"))
    assert torch.equal(data.train_labels, written["train"][1]) and torch.equal(data.test_labels, written["test"][1])


@pytest.mark.parametrize("name", ["kmnist", "emnist", "cifar100", "svhn"])
def test_missing_data_offline_says_how_to_get_it(tmp_path, offline, name, capsys):
    conf = tmp_path / "conf.json"
    conf.write_text(f'{{"type": "{name}", "data_dir": "{tmp_path}", "global_epochs": 1}}')
    assert main.main(["-c", str(conf), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"{name} data not found" in error and "To get it: run once online" in error


def test_an_idx_header_whose_sizes_multiply_past_2_64_is_refused(tmp_path, offline):
    folder = tmp_path / "kmnist"
    os.makedirs(folder)
    for name in sum(datasets.IDX_NAMES.values(), ()):  # 2^31 x 2^31 x 4 bytes wraps to 0 in 64-bit arithmetic
        (folder / name).write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 2**31, 2**31, 4))
    with pytest.raises(datasets.DataError, match="is truncated or damaged: 16 bytes, its header promises"):
        datasets.load("kmnist", str(tmp_path), "cpu")


def test_damaged_files_that_fail_torchvisions_checksum_are_named_as_there(tmp_path, offline):
    os.makedirs(tmp_path / "svhn")
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(datasets.DataError) as error:
        datasets.load("svhn", str(tmp_path), "cpu")
    assert f"{tmp_path / 'svhn'} (there, but torchvision finds its files missing or damaged: delete the folder to " \
           f"download again)" in str(error.value)
