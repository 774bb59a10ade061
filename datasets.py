"""Datasets held in memory as normalized tensors, batches cut from them on the run's device.

mnist / fashion-mnist / cifar come through torchvision (from `data_dir`, or downloaded there when online);
mnist and fashion-mnist are also read from gzipped IDX files, such as those the Debian package dataset-fashion-mnist
installs under /usr/share/datasets/fashion-mnist. `synthetic` is generated: small, deterministic, offline.
"""
import gzip
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

# per-channel (mean, std) of the training images, so inputs reach the model centred and scaled
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
TORCHVISION_CLASS_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar": "CIFAR10"}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar": "cifar-10-batches-py"}  # in data_dir
SYSTEM_DIRS = {"mnist": ["/usr/share/datasets/mnist"], "fashion-mnist": ["/usr/share/datasets/fashion-mnist"]}
IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET = {
    "fashion-mnist": "install the Debian package dataset-fashion-mnist, or run once online",
    "mnist": "run once online, or put the IDX files there",
    "cifar": "run once online, or put torchvision's cifar-10-batches-py folder there",
}
NUM_CLASSES = 10  # every dataset here has ten labels, 0 to 9
SYNTHETIC_SHAPE, SYNTHETIC_SIZES = (1, 16, 16), {"train": 3000, "test": 1000}
CROP_PADDING = 4


class DataError(Exception):
    """The data cannot be found or read; the message says where it looked and how to get it."""


@dataclass
class Dataset:
    name: str
    train_images: torch.Tensor  # float32 (N, C, H, W), normalized, on the run's device
    train_labels: torch.Tensor  # int64 (N,), on the run's device
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    augment: bool  # CIFAR: random crop with padding and horizontal flip, per training batch
    pad_value: torch.Tensor | None  # per-channel value of a black pixel after normalization (for padding crops)
    source: str  # where the data was read from

    @property
    def image_shape(self):
        return tuple(self.train_images.shape[1:])

    def train_split(self, indices):
        """(images, labels) of the training examples at `indices` (CPU int64), as they are stored: not augmented."""
        indices = indices.to(self.train_images.device)
        return self.train_images[indices], self.train_labels[indices]

    def train_batches(self, indices, batch_size, generator):
        """Shuffled (images, labels) batches over `indices` (a CPU int64 tensor), one pass."""
        order = indices[torch.randperm(len(indices), generator=generator)].to(self.train_images.device)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            images = self.train_images[batch]
            if self.augment:
                images = self._crop_and_flip(images, generator)
            yield images.contiguous(memory_format=torch.channels_last), self.train_labels[batch]

    def _crop_and_flip(self, images, generator):
        n, channels, height, width = images.shape
        p = CROP_PADDING
        padded = self.pad_value.view(1, channels, 1, 1).expand(n, channels, height + 2 * p, width + 2 * p).clone()
        padded[:, :, p:p + height, p:p + width] = images
        device = images.device
        top = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(device)
        left = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(device)
        flip = (torch.rand(n, generator=generator) < 0.5).to(device)
        rows = (top[:, None] + torch.arange(height, device=device))[:, None, :, None]
        cols = (left[:, None] + torch.arange(width, device=device))
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
        sample = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(channels, device=device)[None, :, None, None]
        return padded[sample, channel, rows, cols]


def load(name, data_dir, device):
    """The dataset `name` with both splits on `device`."""
    if name == "synthetic":
        splits = {split: _synthetic(split) for split in ("train", "test")}
        return _to_dataset(name, splits, None, "generated", device)
    splits, source = _find(name, data_dir)
    for split, (images, labels) in splits.items():
        if len(labels) == 0:
            raise DataError(f"the {split} split of {name} in {source} holds no examples")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise DataError(f"the {split} labels of {name} in {source} run from {int(labels.min())} to "
                            f"{int(labels.max())}; expected 0 to {NUM_CLASSES - 1}")
    mean, std = (torch.tensor(v) for v in NORMALIZATION[name])
    for split, (images, labels) in splits.items():
        splits[split] = ((images.float() / 255 - mean.view(-1, 1, 1)) / std.view(-1, 1, 1), labels)
    return _to_dataset(name, splits, ((0 - mean) / std).to(device), source, device)


def _to_dataset(name, splits, pad_value, source, device):
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    train_x, test_x = (x.to(device).contiguous(memory_format=torch.channels_last) for x in (train_x, test_x))
    return Dataset(name, train_x, train_y.to(device), test_x, test_y.to(device),
                   num_classes=NUM_CLASSES, augment=name == "cifar", pad_value=pad_value, source=source)


def _find(name, data_dir):
    """(splits of uint8 NCHW images and int64 labels, where they came from), trying each source in turn."""
    looked = [f"{data_dir} (torchvision's layout)"]
    if os.path.isdir(os.path.join(data_dir, TORCHVISION_FOLDERS[name])):  # else torchvision need not even load
        try:
            return _torchvision_splits(name, data_dir, download=False), data_dir
        except RuntimeError as e:
            if "not found" not in str(e):  # torchvision's word for missing files; anything else means damaged ones
                raise _damaged(name, data_dir, e) from None
        except Exception as e:  # torchvision reading garbage raises AssertionError, KeyError, ValueError, ...
            raise _damaged(name, data_dir, e) from None
    idx_dirs = [os.path.join(data_dir, name), data_dir] + SYSTEM_DIRS[name] if name in SYSTEM_DIRS else []
    for directory in idx_dirs:
        looked.append(directory)
        splits = _read_idx_dir(directory)
        if splits:
            return splits, directory
    try:
        return _torchvision_splits(name, data_dir, download=True), f"downloaded to {data_dir}"
    except Exception as e:  # URLError, RuntimeError, a damaged archive: the download did not give usable data
        failure = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
    raise DataError(f"{name} data not found: looked in {', '.join(looked)}; download failed ({failure}). "
                    f"To get it: {HOW_TO_GET[name]}")


def _damaged(name, data_dir, error):
    return DataError(f"{name} files in {data_dir} (torchvision's layout) cannot be read ({type(error).__name__}: "
                     f"{' '.join(str(error).split())[:200]}); delete them to download again")


def torchvision_class(name):
    """torchvision's dataset class for `name`, imported only now: torchvision takes a second to import, and a run on
    IDX files or synthetic data (or a Flower node, per message) does without it."""
    import torchvision
    return getattr(torchvision.datasets, TORCHVISION_CLASS_NAMES[name])


def _torchvision_splits(name, data_dir, download):
    splits = {}
    for split in ("train", "test"):
        dataset = torchvision_class(name)(data_dir, train=split == "train", download=download)
        images = torch.as_tensor(np.asarray(dataset.data))
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        splits[split] = (images.contiguous(), torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64))
    return splits


def _read_idx_dir(directory):
    """Both splits from IDX files (gzipped or not) in `directory`, or None when they are not all there."""
    splits = {}
    for split, (images_name, labels_name) in IDX_NAMES.items():
        paths = [_existing(directory, base) for base in (images_name, labels_name)]
        if None in paths:
            return None
        images, labels = (_read_idx(path) for path in paths)
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(f"IDX files in {directory} do not hold matching images and labels")
        splits[split] = (images.unsqueeze(1), labels.long())
    return splits


def _existing(directory, base):
    for candidate in (base + ".gz", base):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_idx(path):
    """An IDX file of unsigned bytes (the MNIST format) as a uint8 tensor."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    dims = raw[3]
    if len(raw) < 4 + 4 * dims:
        raise DataError(f"{path} is truncated: its header is cut short")
    shape = np.frombuffer(raw, dtype=">u4", count=dims, offset=4).astype(np.int64)
    expected = 4 + 4 * dims + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or damaged: {len(raw)} bytes, its header promises {expected}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape.tolist()).copy())


def _synthetic(split):
    """Noisy copies of ten fixed random prototypes: learnable in a few rounds, hard enough to show progress."""
    prototypes = torch.randn((10, *SYNTHETIC_SHAPE), generator=torch.Generator().manual_seed(0))
    draw = torch.Generator().manual_seed(1 if split == "train" else 2)
    labels = torch.randint(0, 10, (SYNTHETIC_SIZES[split],), generator=draw)
    images = prototypes[labels] + 2.0 * torch.randn((len(labels), *SYNTHETIC_SHAPE), generator=draw)
    return images, labels
