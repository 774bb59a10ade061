"""fedsparse: federated averaging where each client uploads only part of its model update.

Run:     python main.py -c ./utils/conf.json [--set prop=0.5 ...] [--out DIR]
Resume:  python main.py --out DIR --resume          (continues an interrupted run to the same end)
Sweep:   python main.py -c ./utils/conf.json --sweep prop=1.0,0.8,0.5 [--out DIR]

Each round: sample k clients; each trains from the global model on its own data and uploads its masked weight
diff as an encoded payload; the server decodes and averages the uploads into the global model and evaluates it.
One line per round is printed, and <out>/metrics.csv, <out>/config.json and <out>/checkpoint.pt are written.
"""
import argparse
import copy
import os
import shlex
import sys
import time

import datasets
import federation
import models
from engines.inprocess import InProcess
from federation import RunError
from utils import config, partition, run_files


def resolve(args):
    """(config, run folder) from the command line; a resumed run keeps the config it started with."""
    overrides = config.load(args.conf) if args.conf else {}
    for assignment in args.set:
        key, value = config.parse_assignment(assignment)
        overrides[key] = value
    conf, out = _resolve_config(args, overrides)
    # fail before loading data or creating a folder
    federation.pick_device(conf["device"])
    models.check_name(conf["model_name"])
    return conf, out


def _resolve_config(args, overrides):
    if not args.resume:
        if not args.conf:
            raise RunError("give a config with -c FILE (or --resume with --out DIR)")
        conf = config.validate(overrides)
        out = args.out or new_run_dir(conf)
        if os.path.exists(run_files.checkpoint_path(out)):
            raise RunError(f"{out} already holds a run: continue it with --resume, or choose another --out")
        return conf, out
    if not args.out or not os.path.exists(run_files.checkpoint_path(args.out)):
        raise RunError(f"nothing to resume: no checkpoint.pt in {args.out or '(give the run folder with --out)'}")
    try:
        saved = config.validate(run_files.read_config(args.out))
    except (OSError, ValueError) as e:  # ValueError includes JSON errors and ConfigError
        raise RunError(f"cannot resume {args.out}: its config.json is unreadable ({e})") from None
    conf = config.validate({**saved, **overrides} if not args.conf else overrides)
    changed = [key for key in conf if conf[key] != saved[key] and key != "global_epochs"]
    if changed:
        raise RunError(f"--resume: config differs from {args.out}/config.json in {', '.join(changed)}")
    return conf, args.out


def new_run_dir(conf):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}-{conf['type']}-{conf['sparsifier']}-prop{conf['prop']:g}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def sweep(args):
    """One run per value of the swept key into <out>/<key>=<value>/, then the comparison figure."""
    key, sep, values = args.sweep.partition("=")
    if not sep or not values:
        raise RunError(f"--sweep expects KEY=V1,V2,..., got {args.sweep!r}")
    base_out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-sweep-{key}")
    run_dirs = []
    for raw in values.split(","):
        run_dir = os.path.join(base_out, f"{key}={raw}")
        sub_args = copy.copy(args)
        sub_args.set, sub_args.out = args.set + [f"{key}={raw}"], run_dir
        sub_args.resume = args.resume and os.path.exists(run_files.checkpoint_path(run_dir))
        run_dirs.append((sub_args, run_dir))
    confs = [resolve(sub_args) for sub_args, _ in run_dirs]  # check every value before the first run starts
    try:
        for (conf, run_dir), (sub_args, _) in zip(confs, run_dirs):
            print(f"== {run_dir}")
            start(conf, run_dir, sub_args.resume)
    except Interrupted as e:
        if not e.args[0] and not any(os.path.exists(run_files.checkpoint_path(d)) for _, d in run_dirs):
            raise
        sets = "".join(f" --set {shlex.quote(s)}" for s in args.set)
        raise Interrupted(f"python main.py -c {shlex.quote(args.conf or '')}{sets} --sweep {shlex.quote(args.sweep)}"
                          f" --out {shlex.quote(base_out)} --resume") from None
    from utils import plot  # matplotlib loads only when a figure is drawn
    figure = os.path.join(base_out, "comparison.png")
    conf = confs[0][0]
    title = (f"{conf['type']}, {conf['model_name']}, {conf['no_models']} clients, k={conf['k']}, "
             f"{conf['sparsifier']} sparsifier, {conf['aggregation']} aggregation")
    plot.plot_runs([run_dir for _, run_dir in run_dirs], figure, title)
    print(f"figure: {figure}")


def start(conf, out, resume):
    try:
        rows = federation.run(conf, out, resume, InProcess)
    except KeyboardInterrupt:
        saved = os.path.exists(run_files.checkpoint_path(out))
        raise Interrupted(f"python main.py --out {shlex.quote(out)} --resume" if saved else None) from None
    if rows:
        sent, dense = run_files.upload_totals(rows)
        print(f"done: {out}  final accuracy {rows[-1]['accuracy']:.4f}, "
              f"uploaded {sent / 1e6:.2f} MB ({sent / dense:.1%} of dense)")


class Interrupted(Exception):
    """Ctrl-C during a run: the finished rounds are saved; the message is the command that continues."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, instead of argparse's usage block
        raise RunError(message)


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--conf", help="JSON config file (utils/conf.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; VALUE is JSON or a bare string; may repeat")
    parser.add_argument("--out", help="the run's folder (default: a new folder under runs/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...", help="one run per value, then a comparison figure")
    return parser.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.sweep:
            sweep(args)
        else:
            conf, out = resolve(args)
            start(conf, out, args.resume)
    except (config.ConfigError, datasets.DataError, models.ModelError, partition.PartitionError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        resume = e.args[0] if isinstance(e, Interrupted) else None
        print(f"\ninterrupted: finished rounds are saved; continue with: {resume}" if resume else
              "\ninterrupted before any round finished: nothing was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
