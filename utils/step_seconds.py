"""Measure `step_seconds` for the simulated clock: the seconds of one local SGD step of a model on this machine.

    python -m utils.step_seconds [--model cnn] [--type fashion-mnist] [--batch-size 32] [--threads N] [--steps 200]

It trains the model on random images of the dataset's shape (the data's values do not change a step's cost), drops
the first steps (allocation, caches), and prints the median of the rest. Give the result to a run as
`--set step_seconds=...`: the clock then charges a client `steps * step_seconds * its slowness` for its training, and
never reads the host's time itself. This is the only place that does.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import models
from utils import cli
from utils.config import KEYS

SHAPES = {"mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "cifar": ((3, 32, 32), 10),
          "synthetic": ((1, 28, 28), 10)}  # (image shape, classes), as datasets.py loads them
WARMUP = 20  # steps left out of the median


def measure(model_name, data_type, batch_size, steps, threads=None):
    """The median seconds of one SGD step (forward, backward, update) over `steps` timed steps."""
    if threads:
        torch.set_num_threads(threads)
    image_shape, classes = SHAPES[data_type]
    torch.manual_seed(0)
    model = models.build(model_name, image_shape, classes)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(batch_size, *image_shape).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(classes, (batch_size,))
    seconds = []
    for step in range(WARMUP + steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if step >= WARMUP:
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--model", default=KEYS["model_name"][0], help="a model_name (default: the config's)")
    parser.add_argument("--type", default=KEYS["type"][0], choices=sorted(SHAPES), help="the dataset's image shape")
    parser.add_argument("--batch-size", type=int, default=KEYS["batch_size"][0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, this machine's cores)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps (after 20 left out)")
    args = parser.parse_args(argv)
    if not (1 <= args.batch_size <= 4096 and 1 <= args.steps <= 100_000 and 1 <= (args.threads or 1) <= 1024):
        print("error: --batch-size must be 1 to 4096, --steps 1 to 100000, --threads 1 to 1024", file=sys.stderr)
        return 2
    try:
        models.check_name(args.model)
    except models.ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = measure(args.model, args.type, args.batch_size, args.steps, args.threads)
    print(f"{seconds:.6g}  # step_seconds: {args.model}, {args.type} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
