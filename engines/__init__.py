"""Engines: how the sampled clients get trained. Each module offers a transport with the same three methods.

    train(chosen, syncs, global_state, round_index, progress) -> the clients' Uploads, sorted by client id
        (syncs: client id -> the bytes it downloads to hold global_state; downloads.apply_sync applies them)
    drop(dropped)  (under a deadline or over-selection, after every train: the ids whose uploads the server discarded,
        possibly none; those clients keep all of their diffs as their error-feedback residual, not what was sent)
    client_state() -> what the transport itself keeps for the checkpoint: {"models": {id: the model a node holds, a
        dense payload}} (what clients keep between rounds, their residuals and warm starts, lives in the client store
        given to the transport: client_store.py)
    restore_client_state(state)  (client ids already checked against the run's clients by federation.restore)
    client_threads: the torch threads each client trains with (environment.json records it, null where a transport
        does not say: the uploads' last digits depend on it)
    secure_sum: after train, the round's sums when the transport ran secure aggregation itself (Flower's SecAgg+:
        secure.delivered), its Uploads then carrying no payload; None when the server sums the payloads

A transport is built as transport_factory(conf, dataset, shares, workspace model, client store).

inprocess: one process trains the clients one after another (the default), or some at once on threads.
flower: Flower's simulation engine (Ray actors) and deployment engine (a SuperLink and SuperNodes).
"""
import math

import torch


def client_threads(parallel, client_cpus=None):
    """The torch threads each client trains with when `parallel` train at once: `client_cpus` (a fraction rounds down,
    to at least 1), or this process's threads shared among them. A client's upload depends on the count in its last
    digits, so every engine trains with the count this gives."""
    return max(1, int(client_cpus or torch.get_num_threads() // parallel))


def node_gpus(client_gpus, parallel):
    """The GPUs the Flower simulation's Ray node declares for `parallel` actors of `client_gpus` each: a whole number,
    as Ray wants for a node (its actors may take fractions). Rounded to Ray's precision, 0.0001, first: in floats,
    0.28 * 25 is a little over 7, and should not ask for an eighth GPU."""
    return math.ceil(round(client_gpus * parallel, 4))


def check_secure_aggregation(conf):
    """The Flower engines run secure aggregation for real (engines/secagg.py): refuse, before anything starts, what
    Flower's SecAgg+ cannot do as the simulation does. Returns the reason, or None."""
    if not conf["secure_aggregation"]:
        return None
    conflicts = [
        (conf["error_feedback"], "error_feedback (a node's residual travels back to the server for the run's "
                                 "checkpoint, and would show it what the sum hides)"),
        (conf["deadline"] > 0 or conf["over_select"] > 1,
         "a deadline or over-selection (SecAgg+ sums every node that answers: a late upload cannot be taken out of "
         "the sum)"),
        (conf["secagg_bits"] > 32, f"secagg_bits {conf['secagg_bits']} (Flower's SecAgg+ masks modulo at most 2^32)")]
    return next((f"secure_aggregation on Flower cannot be combined with {why}" for refused, why in conflicts
                 if refused), None)
