"""Datasets held in memory as tensors (images normalized), batches cut from them on the run's device.

The built-in ones (BUILTINS) come through torchvision, from `data_dir` or downloaded there when online; mnist,
fashion-mnist and kmnist are also read from gzipped IDX files, such as those the Debian package dataset-fashion-mnist
installs under /usr/share/datasets/fashion-mnist. `synthetic` is generated: small, deterministic, offline. A user's
own data is named "package.module:function": the function returns a dict of tensors (see USER_KEYS).
"""
import functools
import gzip
import hashlib
import inspect
import math
import numbers
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from models import channels_last
from utils import user_code


@dataclass(frozen=True)
class Builtin:
    """A dataset torchvision reads from its files under data_dir, and downloads there when online."""
    torchvision_name: str  # its class in torchvision.datasets
    folder: str  # the folder torchvision keeps it in under data_dir: if it is absent, torchvision need not even load
    num_classes: int
    input_shape: tuple  # (channels, height, width)
    mean: tuple  # per-channel mean and std of the training images, so inputs reach the model centred and scaled
    std: tuple
    how_to_get: str
    augment: bool = False  # random crop with padding and horizontal flip, per training batch
    idx: bool = False  # also read from MNIST-named IDX files in data_dir/<name>, data_dir and `system_dirs`
    system_dirs: tuple = ()
    options: dict = field(default_factory=dict)  # more arguments to torchvision's class
    root_is_folder: bool = False  # torchvision keeps its files in the root it is given (SVHN): give it the folder
    channels_last_files: bool = False  # torchvision's array is (N, H, W, C)


BUILTINS = {
    "mnist": Builtin("MNIST", "MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,),
                     "run once online, or put the IDX files there", idx=True,
                     system_dirs=("/usr/share/datasets/mnist",)),
    "fashion-mnist": Builtin("FashionMNIST", "FashionMNIST", 10, (1, 28, 28), (0.2860,), (0.3530,),
                             "install the Debian package dataset-fashion-mnist, or run once online", idx=True,
                             system_dirs=("/usr/share/datasets/fashion-mnist",)),
    "kmnist": Builtin("KMNIST", "KMNIST", 10, (1, 28, 28), (0.1918,), (0.3483,),
                      "run once online, or put the IDX files there", idx=True),
    # EMNIST's balanced split: 47 classes (digits, upper-case letters, the lower-case ones that differ from them)
    "emnist": Builtin("EMNIST", "EMNIST", 47, (1, 28, 28), (0.1751,), (0.3332,),
                      "run once online (a 0.5 GB archive), or put torchvision's EMNIST/raw folder there",
                      options={"split": "balanced"}),
    "cifar": Builtin("CIFAR10", "cifar-10-batches-py", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                     (0.2470, 0.2435, 0.2616), "run once online, or put torchvision's cifar-10-batches-py folder there",
                     augment=True, channels_last_files=True),
    "cifar100": Builtin("CIFAR100", "cifar-100-python", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                        (0.2673, 0.2564, 0.2762), "run once online, or put torchvision's cifar-100-python folder there",
                        augment=True, channels_last_files=True),
    # house numbers: cropped, not flipped (a mirrored digit is another symbol)
    "svhn": Builtin("SVHN", "svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                    "run once online, or put train_32x32.mat and test_32x32.mat in data_dir/svhn",
                    root_is_folder=True),
}
IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SYNTHETIC_SHAPE, SYNTHETIC_SIZES, SYNTHETIC_CLASSES = (1, 16, 16), {"train": 3000, "test": 1000}, 10
CROP_PADDING = 4
# a user's data: the keys its function returns (train_clients is optional: a client id per training example)
USER_KEYS = ("train_inputs", "train_labels", "test_inputs", "test_labels", "num_classes")
USER_OPTIONAL_KEYS = ("train_clients",)
MAX_CLASSES = 1_000_000


class DataError(Exception):
    """The data cannot be found or read; the message says where it looked and how to get it."""


@dataclass
class Dataset:
    name: str
    train_inputs: torch.Tensor  # (N, ...) on the run's device: images float32 (N, C, H, W), normalized
    train_labels: torch.Tensor  # int64 (N,), on the run's device
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    augment: bool  # CIFAR: random crop with padding and horizontal flip, per training batch
    pad_value: torch.Tensor | None  # per-channel value of a black pixel after normalization (for padding crops)
    source: str  # where the data was read from
    train_clients: torch.Tensor | None = None  # CPU int64 (N,): the client (0 ..) each example belongs to, if the
    # data names one (a natural partition)

    @property
    def input_shape(self):
        return tuple(self.train_inputs.shape[1:])

    @functools.cached_property
    def digest(self):
        """A digest of every example, label and client id: a resumed run checks that its data did not change."""
        digest = hashlib.blake2b(repr((self.num_classes, self.train_inputs.dtype)).encode(), digest_size=16)
        for tensor in (self.train_inputs, self.train_labels, self.test_inputs, self.test_labels, self.train_clients):
            if tensor is not None:
                digest.update(repr(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def train_split(self, indices):
        """(inputs, labels) of the training examples at `indices` (CPU int64), as they are stored: not augmented."""
        indices = indices.to(self.train_inputs.device)
        return self.train_inputs[indices], self.train_labels[indices]

    def train_batches(self, indices, batch_size, generator):
        """Shuffled (inputs, labels) batches over `indices` (a CPU int64 tensor), one pass."""
        order = indices[torch.randperm(len(indices), generator=generator)].to(self.train_inputs.device)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            inputs = self.train_inputs[batch]
            if self.augment:
                inputs = self._crop_and_flip(inputs, generator)
            yield channels_last(inputs), self.train_labels[batch]

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


def check_name(name):
    """Refuse an unknown dataset before anything else is done (a user's function is looked up, not yet called)."""
    try:
        if user_code.is_spec(name):
            user_code.find(name, "type")
    except user_code.UserCodeError as e:
        raise DataError(str(e)) from None


def load(name, data_dir, device):
    """The dataset `name` with both splits on `device`."""
    if user_code.is_spec(name):
        return _user_data(name, device)
    if name == "synthetic":
        splits = {split: _synthetic(split) for split in ("train", "test")}
        return _to_dataset(name, splits, SYNTHETIC_CLASSES, False, None, "generated", device)
    builtin = BUILTINS[name]
    splits, source = _find(name, data_dir)
    for split, (images, labels) in splits.items():
        if len(labels) == 0:
            raise DataError(f"the {split} split of {name} in {source} holds no examples")
        if tuple(images.shape[1:]) != builtin.input_shape:
            shapes = ("x".join(map(str, shape)) for shape in (images.shape[1:], builtin.input_shape))
            raise DataError(f"the {split} images of {name} in {source} have shape {next(shapes)}; expected "
                            f"{next(shapes)}")
        _check_labels(labels, builtin.num_classes, f"the {split} labels of {name} in {source}")
    mean, std = (torch.tensor(v) for v in (builtin.mean, builtin.std))
    for split, (images, labels) in splits.items():
        splits[split] = ((images.float() / 255 - mean.view(-1, 1, 1)) / std.view(-1, 1, 1), labels)
    return _to_dataset(name, splits, builtin.num_classes, builtin.augment, ((0 - mean) / std).to(device), source,
                       device)


def _check_labels(labels, num_classes, what):
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{what} run from {int(labels.min())} to {int(labels.max())}; expected 0 to {num_classes - 1}")


def _to_dataset(name, splits, num_classes, augment, pad_value, source, device, train_clients=None):
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    train_x, test_x = (channels_last(x.to(device)) for x in (train_x, test_x))
    return Dataset(name, train_x, train_y.to(device), test_x, test_y.to(device), num_classes=num_classes,
                   augment=augment, pad_value=pad_value, source=source, train_clients=train_clients)


def _user_data(spec, device):
    """A user's data: the dict its function returns, checked key by key, so that a mistake is named before a run."""
    try:
        data = user_code.call(spec, "type")
    except user_code.UserCodeError as e:
        raise DataError(str(e)) from None
    where = f"type '{spec}'"
    if not isinstance(data, dict):
        if inspect.iscoroutine(data):
            data.close()  # an async function's result: never awaited, and closed, so Python does not warn of it
        raise DataError(f"{where} returned {type(data).__name__}; it must return a dict with {', '.join(USER_KEYS)}")
    missing = [key for key in USER_KEYS if key not in data]
    unknown = sorted(map(str, set(data) - set(USER_KEYS) - set(USER_OPTIONAL_KEYS)))
    if missing or unknown:
        raise DataError(f"{where} returned a dict " + (f"without {', '.join(missing)}" if missing else
                        f"with unknown keys {', '.join(unknown)} (it may hold "
                        f"{', '.join(USER_KEYS + USER_OPTIONAL_KEYS)})"))
    num_classes = data["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or \
            not 2 <= num_classes <= MAX_CLASSES:
        raise DataError(f"{where}: num_classes must be a whole number from 2 to {MAX_CLASSES}, got {num_classes!r}")
    splits = {}
    for split in ("train", "test"):
        inputs = _user_inputs(data[f"{split}_inputs"], f"{where}: {split}_inputs")
        labels = _user_integers(data[f"{split}_labels"], f"{where}: {split}_labels")
        if len(labels) != len(inputs):
            raise DataError(f"{where}: {split}_labels has {len(labels)} entries for {len(inputs)} {split}_inputs")
        _check_labels(labels, int(num_classes), f"{where}: {split}_labels")
        splits[split] = (inputs, labels)
    train_shape, test_shape = (tuple(splits[split][0].shape[1:]) for split in ("train", "test"))
    if train_shape != test_shape or splits["train"][0].dtype != splits["test"][0].dtype:
        raise DataError(f"{where}: test_inputs are {splits['test'][0].dtype} of shape {test_shape} per example, "
                        f"train_inputs {splits['train'][0].dtype} of shape {train_shape}")
    clients = None
    if data.get("train_clients") is not None:
        ids = _user_integers(data["train_clients"], f"{where}: train_clients")
        if len(ids) != len(splits["train"][1]):
            raise DataError(f"{where}: train_clients has {len(ids)} entries for {len(splits['train'][1])} "
                            f"training examples")
        clients = torch.unique(ids, return_inverse=True)[1]  # ids in increasing order become clients 0, 1, ...
    return _to_dataset(spec, splits, int(num_classes), False, None, user_code.source(spec), device, clients)


def _user_inputs(value, what):
    """Inputs as a tensor: floating point as float32 (finite), integers (token ids, say) as int64."""
    tensor = _user_tensor(value, what)
    if tensor.dim() < 2 or tensor.numel() == 0:
        raise DataError(f"{what} must hold at least one example of at least one value: (N, ...), got shape "
                        f"{tuple(tensor.shape)}")
    if tensor.is_floating_point():
        tensor = tensor.float()
        if not bool(torch.isfinite(tensor).all()):
            raise DataError(f"{what} holds values that are not finite (NaN or infinity)")
        return tensor
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise DataError(f"{what} is {tensor.dtype}; give floating-point values or integers")
    return tensor.long()


def _user_integers(value, what):
    """Labels or client ids: a 1-D tensor of integers, as int64 on the CPU."""
    tensor = _user_tensor(value, what)
    if tensor.dim() != 1 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise DataError(f"{what} must be a 1-D tensor of integers, got {tensor.dtype} of shape {tuple(tensor.shape)}")
    if len(tensor) == 0:
        raise DataError(f"{what} holds no examples")
    return tensor.long()


def _user_tensor(value, what):
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(f"{what} is a numpy array of {value.dtype}; give numbers")
        if value.dtype == np.uint64 and value.size and value.max() > np.iinfo(np.int64).max:
            raise DataError(f"{what} holds values past 2^63 - 1")
        value = torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("="), order="C"))  # a native copy
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{what} must be a torch tensor or a numpy array, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_meta or value.is_nested or value.is_quantized:
        raise DataError(f"{what} must be a dense tensor with its values (not sparse, nested, quantized or on the meta "
                        f"device)")
    return value.detach().cpu().contiguous()


def _find(name, data_dir):
    """(splits of uint8 NCHW images and int64 labels, where they came from), trying each source in turn."""
    builtin = BUILTINS[name]
    looked = [f"{data_dir} (torchvision's layout)"]
    if os.path.isdir(os.path.join(data_dir, builtin.folder)):  # else torchvision need not even load
        try:
            return _torchvision_splits(name, data_dir, download=False), data_dir
        except RuntimeError as e:
            if "not found" not in str(e):  # torchvision's word for missing files; anything else means damaged ones
                raise _damaged(name, data_dir, e) from None
            if "corrupted" in str(e):  # where it checks the files' MD5 (CIFAR, SVHN), missing and damaged read alike
                looked[0] = (f"{os.path.join(data_dir, builtin.folder)} (there, but torchvision finds its files "
                             f"missing or damaged: delete the folder to download again)")
        except Exception as e:  # torchvision reading garbage raises AssertionError, KeyError, ValueError, ...
            raise _damaged(name, data_dir, e) from None
    idx_dirs = [os.path.join(data_dir, name), data_dir, *builtin.system_dirs] if builtin.idx else []
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
                    f"To get it: {builtin.how_to_get}")


def _damaged(name, data_dir, error):
    return DataError(f"{name} files in {data_dir} (torchvision's layout) cannot be read ({type(error).__name__}: "
                     f"{' '.join(str(error).split())[:200]}); delete them to download again")


def torchvision_class(name):
    """torchvision's dataset class for `name`, imported only now: torchvision takes a second to import, and a run on
    IDX files or synthetic data (or a Flower node, per message) does without it."""
    import torchvision
    return getattr(torchvision.datasets, BUILTINS[name].torchvision_name)


def _torchvision_splits(name, data_dir, download):
    builtin, splits = BUILTINS[name], {}
    for split in ("train", "test"):
        if builtin.root_is_folder:
            dataset = torchvision_class(name)(os.path.join(data_dir, builtin.folder), split=split, download=download)
        else:
            dataset = torchvision_class(name)(data_dir, train=split == "train", download=download, **builtin.options)
        images = torch.as_tensor(np.asarray(dataset.data))
        images = images.unsqueeze(1) if images.dim() == 3 else images
        images = images.permute(0, 3, 1, 2) if builtin.channels_last_files else images
        labels = dataset.labels if builtin.root_is_folder else dataset.targets  # SVHN names them labels
        splits[split] = (images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64))
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
    shape = [int(n) for n in np.frombuffer(raw, dtype=">u4", count=dims, offset=4)]
    expected = 4 + 4 * dims + math.prod(shape)  # Python's integers: sizes that multiply past 2^64 do not wrap
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or damaged: {len(raw)} bytes, its header promises {expected}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape).copy())


def _synthetic(split):
    """Noisy copies of ten fixed random prototypes: learnable in a few rounds, hard enough to show progress."""
    prototypes = torch.randn((SYNTHETIC_CLASSES, *SYNTHETIC_SHAPE), generator=torch.Generator().manual_seed(0))
    draw = torch.Generator().manual_seed(1 if split == "train" else 2)
    labels = torch.randint(0, SYNTHETIC_CLASSES, (SYNTHETIC_SIZES[split],), generator=draw)
    images = prototypes[labels] + 2.0 * torch.randn((len(labels), *SYNTHETIC_SHAPE), generator=draw)
    return images, labels
