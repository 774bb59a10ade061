"""Engines: how the sampled clients get trained. Each module offers a transport with the same three methods.

    train(chosen, global_state, round_index, progress) -> the clients' Uploads, sorted by client id
    client_state() -> what the clients keep between rounds (error-feedback residuals), for the checkpoint
    restore_client_state(state)  (client ids already checked against the run's clients by federation.restore)

inprocess: one process trains the clients one after another (the default).
flower: Flower's simulation engine (Ray actors) and deployment engine (a SuperLink and SuperNodes).
"""
