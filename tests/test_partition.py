"""utils/partition.py: iid, dirichlet and shards splits; errors; seeding."""
import pytest
import torch

from utils import config, partition


def labels_of(n=1000, classes=10, seed=0):
    """n labels, every class equally often, in a seeded random order."""
    labels = torch.arange(n) % classes
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def conf(**overrides):
    return config.validate({"k": 1, **overrides})


def assert_disjoint_nonempty(shares, n, cover):
    seen = torch.cat(shares)
    assert all(share.dtype == torch.int64 for share in shares)
    assert all(len(share) > 0 for share in shares)
    assert len(seen) == len(set(seen.tolist())), "shares overlap"
    assert seen.min() >= 0 and seen.max() < n
    if cover:
        assert sorted(seen.tolist()) == list(range(n))


def labels_per_client(shares, labels):
    return [len(set(labels[s].tolist())) for s in shares]


def largest_label_share(shares, labels):
    return [torch.bincount(labels[s], minlength=10).max().item() / len(s) for s in shares]


@pytest.mark.parametrize("n, clients", [(1000, 10), (1003, 7), (5, 5)])
def test_iid_is_disjoint_and_covers(n, clients):
    labels = labels_of(n)
    shares = partition.split(labels, conf(no_models=clients, partition="iid"))
    assert len(shares) == clients
    assert_disjoint_nonempty(shares, n, cover=True)
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_disjoint_and_covers():
    labels = labels_of()
    shares = partition.split(labels, conf(no_models=10, partition="dirichlet", alpha=0.5))
    assert len(shares) == 10
    assert_disjoint_nonempty(shares, 1000, cover=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_small_alpha_is_skewed(seed):
    labels = labels_of()
    shares = partition.split(labels, conf(no_models=10, partition="dirichlet", alpha=0.05, seed=seed))
    assert_disjoint_nonempty(shares, 1000, cover=True)
    iid = partition.split(labels, conf(no_models=10, partition="iid", seed=seed))
    assert sum(labels_per_client(iid, labels)) / 10 == 10  # the IID baseline holds every label everywhere
    assert sum(labels_per_client(shares, labels)) / 10 < 5
    assert sum(largest_label_share(shares, labels)) / 10 > 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_large_alpha_is_near_uniform(seed):
    labels = labels_of()
    shares = partition.split(labels, conf(no_models=10, partition="dirichlet", alpha=1000.0, seed=seed))
    assert_disjoint_nonempty(shares, 1000, cover=True)
    assert labels_per_client(shares, labels) == [10] * 10
    assert max(largest_label_share(shares, labels)) < 0.15
    assert all(85 <= len(s) <= 115 for s in shares)


def test_dirichlet_many_clients_all_get_data():
    labels = labels_of(1000)
    shares = partition.split(labels, conf(no_models=100, partition="dirichlet", alpha=0.1))
    assert len(shares) == 100
    assert_disjoint_nonempty(shares, 1000, cover=True)


def test_dirichlet_as_many_clients_as_examples():
    labels = labels_of(50)
    shares = partition.split(labels, conf(no_models=50, partition="dirichlet", alpha=0.1))
    assert sorted(len(s) for s in shares) == [1] * 50
    assert_disjoint_nonempty(shares, 50, cover=True)


@pytest.mark.parametrize("clients, per_client", [(4, 2), (10, 2), (20, 3), (7, 10), (3, 1)])
def test_shards_give_each_client_exactly_its_labels(clients, per_client):
    labels = labels_of()
    shares = partition.split(labels, conf(no_models=clients, partition="shards", shards_per_client=per_client))
    assert len(shares) == clients
    assert_disjoint_nonempty(shares, 1000, cover=False)
    assert labels_per_client(shares, labels) == [per_client] * clients
    # every example of a held label goes to one of its holders
    held = set()
    for share in shares:
        held |= set(labels[share].tolist())
    expected = sorted(i for i in range(1000) if labels[i].item() in held)
    assert sorted(torch.cat(shares).tolist()) == expected


def test_more_clients_than_examples_is_an_error():
    for kind in ("iid", "dirichlet", "shards"):
        with pytest.raises(partition.PartitionError):
            partition.split(labels_of(5, classes=5), conf(no_models=6, partition=kind))


def test_too_many_shards_per_client_is_an_error():
    with pytest.raises(partition.PartitionError):
        partition.split(labels_of(), conf(no_models=4, partition="shards", shards_per_client=11))


def test_label_with_too_few_examples_for_its_holders_is_an_error():
    labels = torch.tensor([0] + [1] * 50 + [2] * 50)  # label 0 has one example
    with pytest.raises(partition.PartitionError):
        partition.split(labels, conf(no_models=6, partition="shards", shards_per_client=3))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_same_seed_same_split_other_seed_other_split(kind):
    labels = labels_of()

    def split(seed):
        return partition.split(labels, conf(no_models=10, partition=kind, seed=seed))
    a, b, c = split(3), split(3), split(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and torch.equal(x, y) for x, y in zip(a, c))


def test_summary_line():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    shares = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5, 6, 7])]  # labels {0}, {1,2}, {2,0,1}
    line = partition.summary(shares, labels)
    assert "3 clients" in line and "min 2" in line and "median 3" in line and "max 3" in line
    assert "2.0 labels per client" in line  # (1 + 2 + 3) / 3
