"""server.py: aggregation rules on hand-computed numbers, rejection of bad uploads, FedAvg equivalence, momentum."""
import copy
import math

import pytest
import torch

import models
import codec
from client import Client
from conftest import handmade_upload, lenient
from server import Server

CPU = torch.device("cpu")
GLOBAL_W = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # tiny_model's weight, flattened
GLOBAL_B = [0.5, -0.5]


def topk_upload(num_samples, w_diff, w_kept, b_diff, b_kept):
    """An upload for nn.Linear(3, 2) carrying the given entries of its (weight, bias) diff."""
    return handmade_upload(num_samples, [w_diff, b_diff], [w_kept, b_kept])


def dense_upload(num_samples, w_diff, b_diff):
    return handmade_upload(num_samples, [w_diff, b_diff])


# Client A (1 sample) sends weight entries 0, 1, 2 and bias entry 0; client B (3 samples) weight 1, 2, 3 and bias 1.
A = dict(num_samples=1, w_diff=[1, 2, 3, 4, 5, 6], w_kept=[0, 1, 2], b_diff=[10, 20], b_kept=[0])
B = dict(num_samples=3, w_diff=[5, 6, 7, 8, 9, 10], w_kept=[1, 2, 3], b_diff=[30, 40], b_kept=[1])


def server_for(model, make_conf, **overrides):
    return lenient(Server(model, make_conf(**overrides), CPU))


def flat_globals(server):
    return [t.tolist() for t in server.flat_globals()]


def assert_close(got, expected):
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)


def test_server_wraps_a_linear_model(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf)
    assert server.numels == [6, 2]
    assert flat_globals(server) == [GLOBAL_W, GLOBAL_B]
    # the server's tensors are the model's own storage: moving them moves the model
    server.globals[0][0, 0] += 1
    assert tiny_model.weight[0, 0].item() == 2.0


def test_masked_mean_by_hand(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf, aggregation="masked_mean")
    assert server.receive(topk_upload(**A)) is None
    assert server.receive(topk_upload(**B)) is None
    server.aggregate()
    # w0: A only -> 1; w1: (1*2 + 3*6)/4 = 5; w2: (1*3 + 3*7)/4 = 6; w3: B only -> 8; w4, w5 unsent -> 0
    # b0: A only -> 10; b1: B only -> 40
    update_w, update_b = [1, 5, 6, 8, 0, 0], [10, 40]
    assert_close(flat_globals(server), [[g + u for g, u in zip(GLOBAL_W, update_w)],
                                        [g + u for g, u in zip(GLOBAL_B, update_b)]])
    assert tiny_model.weight[1, 2].item() == 6.0  # entry 5: sent by nobody, unchanged


def test_mean_by_hand(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf, aggregation="mean")
    server.receive(topk_upload(**A))
    server.receive(topk_upload(**B))
    server.aggregate()
    # sums of n_i * sent diff over total samples 4; unsent counts as 0
    update_w = [1 / 4, (2 + 18) / 4, (3 + 21) / 4, 24 / 4, 0, 0]
    update_b = [10 / 4, 120 / 4]
    assert_close(flat_globals(server), [[g + u for g, u in zip(GLOBAL_W, update_w)],
                                        [g + u for g, u in zip(GLOBAL_B, update_b)]])


def test_lambda_by_hand(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf, aggregation="lambda", **{"lambda": 0.1})
    server.receive(topk_upload(**A))
    server.receive(topk_upload(**B))
    server.aggregate()
    # lambda * k * weighted mean = 0.1 * 2 * mean rule's update
    update_w = [0.2 * u for u in [1 / 4, 5, 6, 6, 0, 0]]
    update_b = [0.2 * u for u in [2.5, 30]]
    assert_close(flat_globals(server), [[g + u for g, u in zip(GLOBAL_W, update_w)],
                                        [g + u for g, u in zip(GLOBAL_B, update_b)]])


def test_lambda_with_equal_samples_is_lambda_times_sum_of_diffs(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf, aggregation="lambda", **{"lambda": 0.5})
    diffs = [([1, -2, 3, 0, 0, 6], [1, 1]), ([3, 2, -1, 4, 0, 0], [0, 2]), ([0, 0, 1, 1, 1, 1], [-4, 0])]
    for w, b in diffs:
        assert server.receive(dense_upload(25, w, b)) is None
    server.aggregate()
    sum_w = [sum(d[0][i] for d in diffs) for i in range(6)]
    sum_b = [sum(d[1][i] for d in diffs) for i in range(2)]
    assert_close(flat_globals(server), [[g + 0.5 * s for g, s in zip(GLOBAL_W, sum_w)],
                                        [g + 0.5 * s for g, s in zip(GLOBAL_B, sum_b)]])


@pytest.mark.parametrize("rule", ["masked_mean", "mean", "lambda"])
def test_rules_against_a_plain_loop(make_conf, rule):
    """Three clients with random positions and sample counts, against a per-entry reference in float64."""
    model = models.build("cnn", (1, 8, 8), 4)
    server = lenient(Server(model, make_conf(aggregation=rule, **{"lambda": 0.3}), CPU))  # each client's own prop
    start = [t.double().clone() for t in server.flat_globals()]
    g = torch.Generator().manual_seed(0)
    clients = []
    for i, (n, prop) in enumerate([(10, 0.2), (35, 0.5), (7, 0.9)]):
        diffs = [torch.randn(t.numel(), generator=g) for t in server.flat_globals()]
        kept = codec.sparsifiers.random_positions(100 + i, prop, server.numels)
        clients.append((n, diffs, kept))
        upload = codec.encode({"sparsifier": "random", "quantize": "none", "prop": prop}, diffs, n, 100 + i)
        assert server.receive(upload.payload) is None
    server.aggregate()
    total = sum(n for n, _, _ in clients)
    for t, (global_entries, numel) in enumerate(zip(start, server.numels)):
        expected = global_entries.clone()
        sums, weights = torch.zeros(numel, dtype=torch.float64), torch.zeros(numel, dtype=torch.float64)
        for n, diffs, kept in clients:
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[kept[t]] = True
            sums += torch.where(mask, n * diffs[t].double(), 0.0)
            weights += mask.double() * n
        if rule == "masked_mean":
            expected += torch.where(weights > 0, sums / weights.clamp(min=1), 0.0)
        elif rule == "mean":
            expected += sums / total
        else:
            expected += 0.3 * 3 * sums / total
        assert torch.allclose(server.flat_globals()[t].double(), expected, atol=1e-5, rtol=1e-5)


def test_nan_or_inf_upload_is_rejected_and_changes_nothing(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf, aggregation="mean")
    for bad in (float("nan"), float("inf"), -float("inf")):
        reason = server.receive(dense_upload(5, [1, 2, bad, 4, 5, 6], [0, 0]))
        assert isinstance(reason, str) and reason
    server.aggregate()
    assert flat_globals(server) == [GLOBAL_W, GLOBAL_B]
    # a rejected upload does not dilute an accepted one: the mean is the good client's diff alone
    assert server.receive(dense_upload(5, [float("nan")] * 6, [0, 0])) is not None
    assert server.receive(dense_upload(5, [1, 1, 1, 1, 1, 1], [2, 2])) is None
    server.aggregate()
    assert_close(flat_globals(server), [[g + 1 for g in GLOBAL_W], [g + 2 for g in GLOBAL_B]])


def test_upload_claiming_no_examples_is_rejected(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf, aggregation="mean")
    reason = server.receive(dense_upload(0, [1] * 6, [1, 1]))
    assert isinstance(reason, str) and "0 training examples" in reason
    server.aggregate()
    assert flat_globals(server) == [GLOBAL_W, GLOBAL_B]


def test_malformed_upload_is_rejected(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf)
    good = dense_upload(5, [1] * 6, [1, 1])
    for bad in (good[:-1], good + b"\0", handmade_upload(5, [[1.0] * 6])):
        reason = server.receive(bad)
        assert isinstance(reason, str) and "malformed" in reason
    server.aggregate()
    assert flat_globals(server) == [GLOBAL_W, GLOBAL_B]


@pytest.mark.parametrize("rule", ["masked_mean", "mean", "lambda"])
def test_prop_zero_leaves_the_model_unchanged(make_conf, synthetic, rule):
    conf = make_conf(prop=0.0, aggregation=rule, sparsifier="random")
    model = models.build("cnn", synthetic.input_shape, synthetic.num_classes)
    before = copy.deepcopy(model.state_dict())
    server = Server(model, conf, CPU)
    workspace = copy.deepcopy(model)
    for client_id in (0, 1):
        upload = Client(client_id, torch.arange(client_id * 100, client_id * 100 + 100), conf).local_train(
            workspace, server.global_state(), synthetic, 1)
        assert server.receive(upload.payload) is None
    assert server.received_entries == 0
    server.aggregate()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sparsifier", ["random", "topk", "none"])
def test_prop_one_masked_mean_is_fedavg(make_conf, synthetic, sparsifier):
    """Uploading everything, the new global model is the sample-weighted mean of the local models."""
    conf = make_conf(prop=1.0, aggregation="masked_mean", sparsifier=sparsifier, lr=0.05)
    model = models.build("cnn", synthetic.input_shape, synthetic.num_classes)
    server = Server(model, conf, CPU)
    workspace = copy.deepcopy(model)
    shares = [torch.arange(0, 64), torch.arange(64, 256), torch.arange(256, 416)]  # 64, 192, 160 samples
    locals_ = []
    for client_id, share in enumerate(shares):
        upload = Client(client_id, share, conf).local_train(workspace, server.global_state(), synthetic, 1)
        locals_.append({k: v.clone() for k, v in workspace.state_dict().items()})
        assert server.receive(upload.payload) is None
    server.aggregate()
    total = sum(len(s) for s in shares)
    for name, value in model.state_dict().items():
        fedavg = sum(len(s) * local[name].double() for s, local in zip(shares, locals_)) / total
        assert torch.allclose(value.double(), fedavg, atol=1e-6, rtol=0), name


def test_server_momentum(tiny_model, make_conf):
    beta = 0.5
    server = server_for(tiny_model, make_conf, aggregation="mean", server_momentum=beta)
    u1_w, u1_b = [1, 2, 3, 4, 5, 6], [1, -1]
    u2_w, u2_b = [0, 1, 0, -1, 0, 2], [4, 4]
    server.receive(dense_upload(3, u1_w, u1_b))
    server.aggregate()  # v1 = u1
    assert_close(flat_globals(server), [[g + u for g, u in zip(GLOBAL_W, u1_w)],
                                        [g + u for g, u in zip(GLOBAL_B, u1_b)]])
    server.receive(dense_upload(3, u2_w, u2_b))
    server.aggregate()  # v2 = beta * u1 + u2; global = g + v1 + v2
    expected_w = [g + a + beta * a + b for g, a, b in zip(GLOBAL_W, u1_w, u2_w)]
    expected_b = [g + a + beta * a + b for g, a, b in zip(GLOBAL_B, u1_b, u2_b)]
    assert_close(flat_globals(server), [expected_w, expected_b])
    assert_close([v.tolist() for v in server.velocity], [[beta * a + b for a, b in zip(u1_w, u2_w)],
                                                         [beta * a + b for a, b in zip(u1_b, u2_b)]])


def test_sums_restart_every_round(tiny_model, make_conf):
    server = server_for(tiny_model, make_conf, aggregation="mean")
    server.receive(dense_upload(1, [1] * 6, [1, 1]))
    server.aggregate()
    server.receive(dense_upload(1, [2] * 6, [2, 2]))
    server.aggregate()  # round 2 moves by its own upload only: +1 then +2
    assert_close(flat_globals(server), [[g + 3 for g in GLOBAL_W], [g + 3 for g in GLOBAL_B]])
    server.aggregate()  # a round with no uploads moves nothing
    assert_close(flat_globals(server), [[g + 3 for g in GLOBAL_W], [g + 3 for g in GLOBAL_B]])


def test_float_buffers_are_aggregated_and_integer_buffers_skipped(make_conf):
    model = torch.nn.BatchNorm1d(2)  # weight, bias, running_mean, running_var (float); num_batches_tracked (int)
    server = lenient(Server(model, make_conf(aggregation="mean"), CPU))
    assert server.numels == [2, 2, 2, 2]
    diffs = [[1.0, 2.0], [3.0, 4.0], [0.5, 0.5], [1.0, 1.0]]
    assert server.receive(handmade_upload(2, diffs)) is None
    server.aggregate()
    assert model.weight.tolist() == [2.0, 3.0] and model.bias.tolist() == [3.0, 4.0]
    assert model.running_mean.tolist() == [0.5, 0.5] and model.running_var.tolist() == [2.0, 2.0]
    assert model.num_batches_tracked.item() == 0


def test_evaluate_by_hand(make_conf):
    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    server = Server(model, make_conf(), CPU)
    images = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 2])
    # logits rows: [2,0,0] -> 0 ok; [0,3,0] -> 1 ok; [1,0,0] -> 0 wrong; [0,0,0] -> argmax 0 wrong
    accuracy, loss = server.evaluate(images, labels)
    assert accuracy == 0.5
    expected = (-math.log(math.e ** 2 / (math.e ** 2 + 2)) - math.log(math.e ** 3 / (math.e ** 3 + 2))
                - math.log(1 / (math.e + 2)) - math.log(1 / 3)) / 4
    assert loss == pytest.approx(expected, rel=1e-6)
