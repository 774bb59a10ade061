"""A model and a dataset of one's own: tabular records from 20 sites, three classes, and a small MLP.

    python main.py -c examples/tabular.json

`data` is the dataset (config key `type: "examples.tabular:data"`), `mlp` the model (`model_name:
"examples.tabular:mlp"`); docs/own-model-and-data.md walks through both. The records are generated, seeded, so that the
example runs offline: each has 12 measurements, and its class depends on them nonlinearly. Each site measures with its
own offset and scale and sees the classes in its own proportions, so the sites' data differ as hospitals' or phones'
do; `train_clients` names each training record's site, and `partition: natural` makes every site one client.
"""
import numpy as np
import torch
from torch import nn

SITES, FEATURES, CLASSES = 20, 12, 3
TRAIN_PER_SITE, TEST_RECORDS = 150, 1000


def data():
    """The dict fedsparse reads: inputs and labels of both splits, the number of classes, and each training
    record's site."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(FEATURES, CLASSES))  # the task every site shares
    offsets, scales = rng.normal(0, 0.5, size=(SITES, FEATURES)), rng.uniform(0.7, 1.3, size=(SITES, FEATURES))
    mix = rng.dirichlet(np.full(CLASSES, 1.0), size=SITES)  # each site's share of each class

    pool = rng.normal(size=(40 * (SITES * TRAIN_PER_SITE + TEST_RECORDS) // CLASSES, FEATURES))
    pool_labels = np.argmax(np.tanh(pool) @ weights + 0.3 * pool[:, :CLASSES] ** 2, axis=1)
    by_class = [iter(pool[pool_labels == label]) for label in range(CLASSES)]

    def records(sites):
        """Records measured at `sites`, each of a class drawn from its site's mix."""
        labels = np.minimum((rng.random((len(sites), 1)) > mix[sites].cumsum(axis=1)).sum(axis=1), CLASSES - 1)
        features = np.stack([next(by_class[label]) for label in labels]) * scales[sites] + offsets[sites]
        return torch.from_numpy(features.astype(np.float32)), torch.from_numpy(labels)

    train_sites = np.repeat(np.arange(SITES), TRAIN_PER_SITE)
    train_inputs, train_labels = records(train_sites)
    test_inputs, test_labels = records(rng.integers(0, SITES, size=TEST_RECORDS))
    return {"train_inputs": train_inputs, "train_labels": train_labels, "test_inputs": test_inputs,
            "test_labels": test_labels, "num_classes": CLASSES, "train_clients": torch.from_numpy(train_sites)}


def mlp(input_shape, num_classes):
    """Two hidden layers of 64 units for records of `input_shape` (here (12,)) measurements."""
    (features,) = input_shape
    return nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes))
