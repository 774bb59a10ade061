"""Secure aggregation on Flower, for real: SecAgg+ (Bell et al. 2020) as Flower implements it, `secaggplus_mod` on the
ClientApp and `SecAggPlusWorkflow` on the server, for the codecs that sum (secure.py).

    python main.py -c ./utils/conf.json --engine flower --set secure_aggregation=true --set sparsifier=none \
        --set quantize=fixed

Each round the server runs the workflow's four stages with the round's sampled nodes: keys, encrypted shares, masked
vectors, unmasking. In the third, each node trains (engines/flower.py's train) and hands secaggplus_mod the values its
upload carries, fixed-point values on the round's movable entries (secure.movable), as float64 arrays, with its weight
(secure.weight) as its example count. Flower multiplies them by the weight and maps them onto the integers 0..T, and
`ranges` chooses its settings so that this is exact: a value code * step of weight w becomes code * w + T/2, nothing
rounded (its stochastic rounding finds nothing to round). The sum, unmasked, dequantized and divided by the total
weight as Flower does, is read back to the integer sums (`sums_from`), exact again: the server then steps exactly as
under the simulated secure aggregation, and the metrics are the same.

What the server sees of a node: its sum's share, masked, and, in the clear as Flower's FitRes carries them, its weight,
its training loss and the checksum of its model after the sync. A node's error-feedback residual would have to travel
to the server for the run's checkpoint, so error feedback is refused here (engines.check_secure_aggregation).
"""
import math
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (Code, FitIns, FitRes, Parameters, Status, bytes_to_ndarray, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

import codec
import privacy
import secure
from codec.quantizers import fixed_step

FLOWER_INT32 = 2 ** 30  # Flower holds a quantized value in an int32: T, a power of two, at most 2^30


# ---- the ClientApp's side -----------------------------------------------------------------------------------------

def mod(message, context, call_next):
    """secaggplus_mod for the messages of SecAgg+'s stages; every other message (this app's own) passes by."""
    if in_protocol(message):
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def in_protocol(message):
    """Whether `message` is one of SecAgg+'s stages (the train handler sees only the collect stage, whose reply is the
    node's share of the sum)."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def task(message):
    """The train task in SecAgg+'s collect stage: the config of the FitIns that the server's round made."""
    return compat.recorddict_to_fitins(message.content, keep_input=True).config


def reply(message, upload, weight, conf, numels, round_index, fields):
    """A node's reply in the collect stage: its upload's values, which secaggplus_mod multiplies by `weight` and masks,
    and `fields` (its client id, training loss and model checksum) as the FitRes's metrics. The upload's bytes
    themselves do not travel."""
    _, positions, values = codec.decode(upload.payload, numels, conf)
    summand = []
    for kept, sent, value in zip(secure.movable(conf, round_index, numels), positions, values):
        if (kept is None) != (sent is None) or (kept is not None and not torch.equal(kept, sent.cpu())):
            raise ValueError("the upload does not carry the round's movable entries")  # the codec's shared mask does
        summand.append(value.double().cpu().numpy())
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(summand), weight, fields)
    return Message(compat.fitres_to_recorddict(result, keep_input=True), reply_to=message)


# ---- the server's side --------------------------------------------------------------------------------------------

def ranges(conf, registered):
    """T, SecAggPlusWorkflow's quantization_range and max_weight: the power of two whose half holds the largest code
    times the largest weight, so that code * w + T/2 lies in 0..T. Refuses a run whose round's sum could wrap the
    field (T/2 per node and the codes' sum: the round's most nodes times T, below 2^secagg_bits), or whose T passes
    Flower's int32."""
    largest_code = 2 ** (conf["fixed_bits"] - 1) - 1
    heaviest = max(secure.weight(conf, count) for count in registered)
    quantization_range = 2 ** (math.ceil(math.log2(largest_code * heaviest)) + 1)
    nodes = len(registered) if privacy.enabled(conf) else conf["k"]  # Poisson sampling may take every client
    if quantization_range > FLOWER_INT32:
        raise secure.SecureAggregationError(
            f"on Flower's SecAgg+, a code times its weight is carried as an integer in 0..T, in an int32: T = "
            f"{quantization_range} here (codes up to {largest_code}, weights up to {heaviest}) passes 2^30: lower "
            f"fixed_bits")
    if nodes * quantization_range >= 2 ** conf["secagg_bits"]:
        who = f"all {nodes} clients (Poisson sampling may take them all)" if privacy.enabled(conf) else f"k = {nodes}"
        raise secure.SecureAggregationError(
            f"on Flower's SecAgg+, a code times its weight is carried as an integer in 0..T, T = {quantization_range} "
            f"here (codes up to {largest_code}, weights up to {heaviest}), and those of {who} must sum below "
            f"2^secagg_bits = 2^{conf['secagg_bits']}: lower fixed_bits or k, or raise secagg_bits (at most 32)")
    return quantization_range


class Exchange:
    """What SecAggPlusWorkflow needs of a grid, send_and_receive, done by the transport's own exchange: its stop, its
    deadline and its short polls (a deployment's grid waits 3 s between asks). A masked vector that is not the
    round's shapes is left out, as if its node had dropped out (SecAgg+ then unmasks the others): Flower adds them by
    numpy's broadcasting, unchecked, so one node's (m, 1) array would make the sum (m, entries), and a short list
    would drop tensors from it."""

    def __init__(self, exchange, timeout, shapes, modulus):
        self.exchange, self.timeout = exchange, timeout
        self.shapes, self.modulus = [(1,)] + [(entries,) for entries in shapes], modulus  # the weight, then the tensors

    def send_and_receive(self, messages, timeout=None):
        replies = self.exchange(list(messages), time.monotonic() + self.timeout)
        return [reply for reply in replies if reply is not None and self.in_shape(reply)]

    def in_shape(self, reply):
        if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
            return True  # the workflow counts an error as a dropout, and fails the round on a record it cannot read
        masked = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
        if masked is None:
            return True  # another stage
        try:
            arrays = [bytes_to_ndarray(data) for data in masked]
        except Exception:  # numpy's reader raises many kinds for bytes that are not an array
            return False
        return len(arrays) == len(self.shapes) and all(
            array.dtype.kind in "iu" and array.shape == shape and ((array >= 0) & (array < self.modulus)).all()
            for array, shape in zip(arrays, self.shapes))


class Round(FedAvg):
    """The workflow's strategy for one round: configure_fit names the round's nodes and their tasks, aggregate_fit keeps
    what the protocol delivered; the server's own step comes after, from the sums."""

    def __init__(self, tasks):
        super().__init__()
        self.tasks = tasks  # node id -> the train task's content
        self.results, self.failures = None, []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, None, 0), FitIns(Parameters([], ""), content)) for node, content in
                self.tasks.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = results, failures
        return None, {}


def run_round(exchange, tasks, round_index, conf, quantization_range):
    """SecAgg+ over the nodes of `tasks` (node id -> train task): {node id: FitRes} of the nodes whose masked vectors
    are in the sum (each FitRes's parameters are the sum, as Flower delivers it), or why the protocol failed."""
    if len(tasks) < 2:
        return f"SecAgg+ needs at least two nodes, this round has {len(tasks)}"
    nodes = len(tasks)
    shares = secure.neighbours(nodes) + 1  # each node and its neighbours in SecAgg+'s graph, as secure.py counts bytes
    workflow = SecAggPlusWorkflow(
        num_shares=shares if 2 < shares < nodes else 1.0,  # 1.0: every node (Flower wants an int above 2)
        # two thirds of a node's shares rebuild its secrets: more than half, so that a server claiming different
        # dropouts to different neighbours cannot rebuild both a node's mask seed and its key (Bell et al. 2020)
        reconstruction_threshold=max(2, math.ceil(2 * shares / 3)),
        max_weight=quantization_range, quantization_range=quantization_range,
        clipping_range=fixed_step(conf["fixed_range"], conf["fixed_bits"]) / 2,
        modulus_range=2 ** conf["secagg_bits"])
    strategy = Round(tasks)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(Parameters([], ""), True)
    try:
        workflow(exchange, context)
    except Exception as e:  # Flower's workflow raises on a node's malformed reply: one node must not end the run
        return f"SecAgg+ failed ({type(e).__name__}: {e})"
    if strategy.results is None:
        return "SecAgg+ halted: too few nodes answered one of its stages"
    return {proxy.node_id: result for proxy, result in strategy.results}


def sums_from(aggregated, total_weight, conf, shapes):
    """Per tensor, the integer sums of weight times code (int64) from the sum as Flower delivers it: dequantized and
    divided by the total weight: S * step / total_weight within a few of float64's roundings, and S is an integer below
    2^32 (the field), so rounding recovers it exactly. Raises ValueError for a sum no honest round gives: not the
    round's `shapes` (entries per tensor), not finite (the weights in the sum summed to 0), off the integers (they
    are not the weights the nodes claimed), or past the largest code times the total weight."""
    step = fixed_step(conf["fixed_range"], conf["fixed_bits"])
    largest = (2 ** (conf["fixed_bits"] - 1) - 1) * total_weight
    arrays = parameters_to_ndarrays(aggregated)
    if [array.shape for array in arrays] != [(entries,) for entries in shapes]:
        raise ValueError(f"the sum's shapes {[array.shape for array in arrays]} are not the round's")
    sums = []
    for values in arrays:
        scaled = np.asarray(values, dtype=np.float64) * total_weight / step
        if not np.isfinite(scaled).all():
            raise ValueError("the sum is not finite: its weights do not add up to the ones the nodes claimed")
        integers = np.rint(scaled)
        if (np.abs(scaled - integers) > 1e-9 * np.maximum(1.0, np.abs(scaled))).any():  # honest: 1e-15 relative
            raise ValueError("the sum is off the fixed-point grid: its weights are not the ones the nodes claimed")
        if (np.abs(integers) > largest).any():
            raise ValueError(f"the sum passes {largest}, the largest code times the weights the nodes claimed")
        sums.append(torch.from_numpy(integers.astype(np.int64)))
    return sums
