"""How much of the model finished runs have trained: a diagnostic for top-k's gap to dense (docs/results.md).

    python figures/coverage.py RUN_DIR [RUN_DIR ...]

For each run, from its checkpoint: the share of entries that ever moved from the initial weights (rebuilt from the
run's seed), how far the model moved, and the norms of the clients' error-feedback residuals (what is still unsent).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
from client_store import ClientStore  # noqa: E402
import models  # noqa: E402
from utils import config, run_files  # noqa: E402
from utils.seeding import derive_seed  # noqa: E402


def flat(state):
    return torch.cat([t.flatten() for t in state.values() if torch.is_floating_point(t)])


def main(run_dirs):
    for run_dir in run_dirs:
        conf = config.validate(run_files.read_config(run_dir))
        data = datasets.load(conf["type"], conf["data_dir"], "cpu")
        torch.manual_seed(derive_seed(conf["seed"], "init"))  # as main.run draws the initial weights
        initial = flat(models.for_data(conf["model_name"], data).state_dict())
        state = run_files.load_checkpoint(run_dir, "cpu")
        moved = flat(state["model"]) - initial
        store = ClientStore(run_dir, state["store"]["numels"], 0, resume=True)
        store.restore(state["store"])
        residuals = sorted(float(torch.cat(store.get("residual", c)).norm()) for c in store.clients("residual"))
        store.close()
        print(f"{run_dir}: entries moved {float((moved != 0).float().mean()):.1%}, distance moved "
              f"{float(moved.norm()):.2f}, residual norms " + (" ".join(f"{n:.2f}" for n in residuals) or "-"))


if __name__ == "__main__":
    main(sys.argv[1:])
