"""Run configuration: every key, its default and its meaning, defined once, plus validation.

A conf file holding only the chapter's keys runs: every newer key has a default here.
"""
import json
import math
import reprlib

import codec
import datasets
import downloads
import robust
from codec import quantizers
from utils import user_code

# key: (default, meaning). The chapter's keys come first, with the chapter's meaning.
KEYS = {
    "model_name": ("cnn", "model: 'cnn' (small CNN), a torchvision name (resnet18, resnet50, vgg16, ...) or your own, "
                          "'package.module:function' (docs/own-model-and-data.md)"),
    "no_models": (10, "number of clients the training set is split across"),
    "type": ("fashion-mnist", "dataset: mnist | fashion-mnist | kmnist | emnist (balanced, 47 classes) | cifar "
                              "(CIFAR-10; also 'cifar10') | cifar100 | svhn | synthetic | your own, "
                              "'package.module:function' (docs/own-model-and-data.md)"),
    "global_epochs": (20, "number of federated rounds"),
    "local_epochs": (1, "passes a sampled client makes over its own data each round"),
    "k": (2, "clients sampled per round"),
    "batch_size": (32, "local SGD mini-batch size"),
    "lr": (0.01, "local SGD learning rate"),
    "momentum": (0.9, "local SGD momentum (the optimizer is fresh each round, as in the chapter)"),
    "lambda": (0.5, "server step for aggregation='lambda': global += lambda * sum of client diffs (the chapter's 0.5)"),
    "prop": (0.6, "fraction of each tensor's entries a client uploads (the mask's density)"),
    "seed": (0, "seeds the partition, client sampling, masks, shuffling and initial weights"),
    "device": ("auto", "auto (CUDA when available) | cpu | cuda"),
    "data_dir": ("./data", "where datasets are looked for first, and downloaded to when online"),
    "aggregation": ("masked_mean", "masked_mean (per entry, over the clients that sent it) | mean (unsent = 0) | lambda"),
    "pretrained": (False, "start torchvision models from their ImageNet weights (needs them downloaded)"),
    "sparsifier": ("random", "which entries travel: " + "; ".join(f"{name}: {cls.help}"
                                                              for name, cls in codec.SPARSIFIERS.items())),
    "quantize": ("none", "how each kept value is written: " + "; ".join(f"{name}: {cls.help}"
                                                                     for name, cls in codec.QUANTIZERS.items())),
    "mask": ("fixed", "random masks: fixed (drawn once per client, the chapter's) | round (fresh every round) | shared "
                      "(one per round for every client: with differential privacy the noise goes only where it "
                      "can move the model)"),
    "error_feedback": (False, "clients keep what they did not send and add it to their next diff"),
    "residual_decay": (1.0, "error feedback: the fraction of the unsent residual a client keeps (1: all of it)"),
    "topk_scope": ("tensor", "topk: keep the largest entries per tensor, or over the whole model ('model')"),
    "topk_share": (0.5, "hybrid: the fraction of the budget (prop) spent on the largest entries; the rest is random"),
    "levels": (4, "qsgd: the number of levels s (1 .. 65535): |value| / bucket norm is rounded to a multiple of 1/s"),
    "bucket_size": (512, "qsgd: values per bucket (one f32 norm each, 1/16 bit per value at 512; the variance bound "
                         "grows as sqrt(bucket_size) / levels)"),
    "fixed_bits": (8, "fixed: the bits of each value's integer code, 2 .. 24 (sign included)"),
    "fixed_range": (0.01, "fixed: values are clipped to +-fixed_range before they are rounded to the shared grid"),
    "rank": (2, "powersgd: the rank r of each factored matrix (1 .. 65535); bytes grow with it: rank 1, 2 and 4 send "
                "about 1%, 1.9% and 3.7% of the default CNN's dense upload"),
    "server_momentum": (0.0, "momentum of the server's update (FedAvgM); 0 applies each round's average as is"),
    "download": ("dense", "how the global model reaches the sampled clients: " + "; ".join(
        f"{name}: {cls.help}" for name, cls in downloads.METHODS.items())),
    "download_sparsifier": ("topk", "download=compressed: which entries of the server's step travel (as `sparsifier`)"),
    "download_prop": (0.04, "download=compressed: fraction of the step's entries broadcast (as `prop`)"),
    "download_quantize": ("ternary", "download=compressed: how each broadcast value is written (as `quantize`)"),
    "download_topk_scope": ("model", "download=compressed: top-k per tensor or over the whole model (as `topk_scope`)"),
    "download_error_feedback": (True, "download=compressed: the server keeps what it did not broadcast and adds it to "
                                      "its next step"),
    "download_first_contact": ("seed", "relay/compressed: a client's first model is built from the shared seed (free) "
                                       "| dense (it downloads the dense model at its first sync)"),
    "partition": ("iid", "iid | dirichlet (label mix per client ~ Dirichlet(alpha)) | shards (few labels per client) | "
                         "natural (the clients your own data names, its train_clients)"),
    "alpha": (0.5, "Dirichlet concentration for partition='dirichlet': small is skewed, large is near IID"),
    "shards_per_client": (2, "partition='shards': how many labels (one shard each) every client holds"),
    "client_state_memory": (1024, "MB of clients' error-feedback residuals and warm starts held in memory, the most "
                                  "recently sampled; the rest are read from the run folder's clients/ when sampled"),
    "server_validation": (1000, "training examples the server holds out of every client's share (seeded) for its own "
                                "decisions: a round after which their loss blew up is rolled back; 0 holds none, and "
                                "then only a non-finite step is refused. The test split never steers training"),
    "clock": ("none", "none: no simulated time (the column 'seconds' is this host's) | simulated: each round's time "
                      "from the bytes each client moved, its local steps and its profile (clock.py): the columns "
                      "round_seconds and sim_seconds, and <out>/clients.csv, one row per round and client"),
    "profile": ("mobile", "clock: the clients' links, latency and compute speed: datacenter | wifi | mobile | mixed "
                          "(presets drawn once, seeded; clock.py names their sources) | the path of a CSV with the "
                          "header client,uplink_mbps,downlink_mbps,latency_ms,slowness,availability"),
    "step_seconds": (0.01, "clock: seconds of one local SGD step on the reference device, whose slowness is 1 (the "
                           "default CNN, batch 32, on this project's 2-core machine; measure yours with python -m "
                           "utils.step_seconds)"),
    "availability": (1.0, "clock: the probability that a client is online in a round (a CSV profile's column "
                          "overrides it); sampling draws among the clients online"),
    "availability_memory": (0.0, "clock: the on/off process of being online: each round a client keeps last round's "
                                 "state with this probability, else it is drawn afresh with its availability (0: "
                                 "independent rounds; 0.9: spells online and offline 10 times longer; the share of "
                                 "rounds online stays the availability)"),
    "deadline": (0.0, "clock: seconds after which a client that has not finished is dropped: its upload is discarded "
                      "(0: wait for every client)"),
    "over_select": (1.0, "clock: sample ceil(k * over_select) clients (at most every online one) and keep the first k "
                         "to finish; the rest are dropped (1: sample k)"),
    "mode": ("sync", "sync: rounds of k clients | async: FedBuff (clock.py and fedbuff.py): `concurrency` clients "
                     "train at once, the server steps each time `buffer_size` uploads have arrived, and global_epochs "
                     "counts server steps (needs clock 'simulated')"),
    "concurrency": (10, "mode=async: how many clients train at once (at most no_models)"),
    "buffer_size": (2, "mode=async: uploads per server step (at most concurrency)"),
    "staleness": ("inverse_sqrt", "mode=async: an upload made s server steps ago is weighted 1/sqrt(1 + s) "
                                  "(inverse_sqrt), or 1 (none)"),
    "defense": ("none", "the server's robust step: none (the aggregation rule) | norm_bound (each upload clipped in L2 "
                        "norm, then the aggregation rule) | median | trimmed_mean (per entry, over the clients that "
                        "sent it, unweighted) | geometric_median (RFA; unsent = 0, weighted by example counts)"),
    "clip_norm": (0.0, "defense=norm_bound: the L2 norm each decoded upload is clipped to; 0: clip_multiple times the "
                       "round's median norm"),
    "clip_multiple": (2.0, "defense=norm_bound with clip_norm 0: the bound, as a multiple of the round's median upload "
                           "norm"),
    "trim_fraction": (0.2, "defense=trimmed_mean: per entry, floor(trim_fraction * senders) values are dropped at each "
                           "end (< 0.5)"),
    "attackers": (0, "simulated attack: clients 0 .. attackers-1 are malicious (0: none)"),
    "attack": ("scale", "what a malicious client does before coding its diff: scale (times attack_scale) | sign_flip "
                        "(times -attack_scale) | noise (plus Gaussian noise, attack_scale times each tensor's own std) "
                        "| fill (every entry is attack_scale) | count (claims 2^32-1 examples)"),
    "attack_scale": (100.0, "the attack's strength: the factor of scale and sign_flip, the noise's std in diff stds, "
                            "fill's value"),
    "attack_from": (1, "the first round in which the malicious clients attack"),
    "attack_until": (0, "the last round in which they attack (0: every round from attack_from on)"),
    "secure_aggregation": (False, "secure aggregation (secure.py; Flower's SecAgg+ on the Flower engines: "
                                  "engines/secagg.py): the server learns only the round's sum, computed modulo "
                                  "2^secagg_bits; needs uploads that sum (sparsifier none, or random with mask shared; "
                                  "quantize fixed) and k of at least 2"),
    "secagg_bits": (32, "secure_aggregation: the field's bits; a run whose round sums could wrap around it is refused "
                        "before it starts"),
    "dp_clip": (0.0, "client-level differential privacy, DP-FedAvg (privacy.py): the L2 norm each decoded update is "
                     "clipped to (by the server; under secure_aggregation by each client, before encoding); clients "
                     "are then sampled independently with probability k / no_models, and the server adds noise to "
                     "the sum and divides by k, in place of the aggregation rule (0: no DP)"),
    "dp_noise_multiplier": (0.0, "DP: the noise's std, as a multiple of dp_clip, added to every entry of the sum of "
                                 "clipped updates (0: clipping only, epsilon infinite)"),
    "dp_delta": (0.0, "DP: the delta at which epsilon is reported (0: 1 / no_models^1.1)"),
    "dp_target_epsilon": (0.0, "DP: refuse, before it starts, a run whose epsilon after global_epochs rounds would "
                               "pass this, naming the rounds it affords (0: no target)"),
}
DEFAULTS = {key: default for key, (default, _) in KEYS.items()}

CHOICES = {
    "type": (*datasets.BUILTINS, "cifar10", "synthetic"),
    "device": ("auto", "cpu", "cuda"),
    "aggregation": ("masked_mean", "mean", "lambda"),
    "sparsifier": tuple(codec.SPARSIFIERS),
    "quantize": tuple(codec.QUANTIZERS),
    "mask": ("fixed", "round", "shared"),
    "topk_scope": ("tensor", "model"),
    "download": tuple(downloads.METHODS),
    "download_sparsifier": tuple(codec.SPARSIFIERS),
    "download_quantize": tuple(codec.QUANTIZERS),
    "download_topk_scope": ("tensor", "model"),
    "download_first_contact": ("seed", "dense"),
    "partition": ("iid", "dirichlet", "shards", "natural"),
    "clock": ("none", "simulated"),
    "mode": ("sync", "async"),
    "staleness": ("inverse_sqrt", "none"),
    "defense": robust.DEFENSES,
    "attack": robust.ATTACKS,
}

USER_CODE_KEYS = ("model_name", "type")  # keys that may name a function of the user's

# what clock 'none' ignores, and what mode 'sync' ignores
CLOCK_KEYS = ("profile", "step_seconds", "availability", "availability_memory", "deadline", "over_select")
ASYNC_KEYS = ("concurrency", "buffer_size", "staleness")

# key: (lowest, highest, whether the lowest is allowed)
RANGES = {
    "no_models": (1, math.inf, True),
    "global_epochs": (1, math.inf, True),  # a run of no round has no metrics to report, plot or resume
    "local_epochs": (1, math.inf, True),
    "k": (1, math.inf, True),
    "batch_size": (1, math.inf, True),
    "lr": (0, math.inf, False),
    "momentum": (0, 1, True),
    "lambda": (0, math.inf, True),
    "prop": (0, 1, True),
    "seed": (0, 2**63 - 1, True),
    "server_momentum": (0, 1, True),
    "residual_decay": (0, 1, True),
    "download_prop": (0, 1, True),
    "topk_share": (0, 1, True),
    "levels": (1, 2**16 - 1, True),  # a u16 on the wire
    "bucket_size": (1, 2**32 - 1, True),  # a u32 on the wire
    "rank": (1, 2**16 - 1, True),  # a u16 on the wire
    "alpha": (0, math.inf, False),
    "shards_per_client": (1, math.inf, True),
    "server_validation": (0, math.inf, True),
    "client_state_memory": (0, math.inf, True),
    "step_seconds": (0, 1e6, False),  # with profiles' bounds (clock.BOUNDS), no simulated time overflows
    "availability": (0, 1, True),
    "availability_memory": (0, 1, True),  # 1 itself is refused below: every client would keep its first state
    "deadline": (0, math.inf, True),
    "over_select": (1, 1e6, True),
    "concurrency": (1, math.inf, True),
    "buffer_size": (1, math.inf, True),
    "clip_norm": (0, math.inf, True),
    "clip_multiple": (0, math.inf, False),
    "trim_fraction": (0, 0.5, True),  # 0.5 itself is refused below
    "attackers": (0, math.inf, True),
    "attack_scale": (0, math.inf, True),
    "attack_from": (1, math.inf, True),
    "attack_until": (0, math.inf, True),
    "fixed_bits": (2, quantizers.FIXED_MOST_BITS, True),
    "fixed_range": (quantizers.FIXED_SMALLEST_RANGE, quantizers.FIXED_LARGEST_RANGE, True),  # the codec's bounds
    "secagg_bits": (8, 62, True),
    "dp_clip": (0, math.inf, True),
    "dp_noise_multiplier": (0, math.inf, True),
    "dp_delta": (0, 1, True),  # 1 itself is refused below
    "dp_target_epsilon": (0, math.inf, True),
}


class ConfigError(ValueError):
    """A configuration the simulator cannot run; its message names the key and the problem."""


def shown(value):
    """`value` as it appears in an error message: repr, shortened when long (a 5000-digit seed stays one short line)."""
    return reprlib.repr(value)


def _check_type(key, value):
    expected = type(DEFAULTS[key])
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"config key '{key}' must be {expected.__name__}, got {shown(value)}")


def validate(overrides):
    """Merge `overrides` over the defaults and check every key; returns the resolved config."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}' (known keys: {', '.join(DEFAULTS)})")
    conf = {**DEFAULTS, **overrides}
    for key, value in conf.items():
        _check_type(key, value)
        if type(DEFAULTS[key]) is float:
            conf[key] = value = float(value)
        if key in USER_CODE_KEYS and user_code.is_spec(value):
            if not user_code.well_formed(value):
                raise ConfigError(f"config key '{key}' names your own function as package.module:function, got "
                                  f"{shown(value)}")
        elif key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}, got {shown(value)}")
        if key in RANGES:
            low, high, low_allowed = RANGES[key]
            if not math.isfinite(value) or value > high or value < low or (value == low and not low_allowed):
                bound = "" if high == math.inf else f" and <= {high}"
                raise ConfigError(f"config key '{key}' must be {'>=' if low_allowed else '>'} {low}{bound}, "
                                  f"got {shown(value)}")
    if conf["k"] > conf["no_models"]:
        raise ConfigError(f"config key 'k' ({conf['k']}) must not exceed 'no_models' ({conf['no_models']})")
    if conf["attackers"] > conf["no_models"]:
        raise ConfigError(f"config key 'attackers' ({conf['attackers']}) must not exceed 'no_models' "
                          f"({conf['no_models']})")
    if conf["attack_until"] and conf["attack_until"] < conf["attack_from"]:
        raise ConfigError(f"config key 'attack_until' ({conf['attack_until']}) is before 'attack_from' "
                          f"({conf['attack_from']}): no round would be attacked")
    if conf["availability_memory"] >= 1:
        raise ConfigError(f"config key 'availability_memory' must be < 1 (at 1 a client would keep its first round's "
                          f"state for ever), got {shown(conf['availability_memory'])}")
    if conf["trim_fraction"] >= 0.5:
        raise ConfigError(f"config key 'trim_fraction' must be < 0.5 (trimming half from each end leaves nothing), got "
                          f"{shown(conf['trim_fraction'])}")
    if conf["download"] == "relay" and conf["server_momentum"]:
        raise ConfigError("download 'relay' cannot be used with server_momentum: a client replaying the uploads would "
                          "need the server's momentum too; use download 'compressed' (the server broadcasts its step) "
                          "or 'dense'")
    clocked = conf["clock"] == "none" and first_set(conf, CLOCK_KEYS)
    if clocked:
        raise ConfigError(f"config key '{clocked}' acts only on the simulated clock: set clock to 'simulated'")
    if conf["mode"] == "async":
        check_async(conf)
    elif first_set(conf, ASYNC_KEYS):
        raise ConfigError(f"config key '{first_set(conf, ASYNC_KEYS)}' acts only in mode 'async'")
    check_privacy(conf)
    check_secure_aggregation(conf)
    if conf["type"] == "cifar10":
        conf["type"] = "cifar"
    return conf


DP_KEYS = ("dp_noise_multiplier", "dp_delta", "dp_target_epsilon")  # what acts only with dp_clip set


def check_secure_aggregation(conf):
    """Secure aggregation sums masked vectors: every upload must carry the same coordinates, on one integer grid, and
    the server must need nothing of any single upload."""
    if not conf["secure_aggregation"]:
        if conf["secagg_bits"] != DEFAULTS["secagg_bits"]:
            raise ConfigError("config key 'secagg_bits' acts only with secure_aggregation")
        return
    shared = conf["sparsifier"] == "random" and conf["mask"] == "shared"
    conflicts = [
        (conf["sparsifier"] != "none" and not shared,
         f"sparsifier '{conf['sparsifier']}'" + (f" with mask '{conf['mask']}'" if conf["sparsifier"] == "random"
                                                 else "") + " (each client would send its own coordinates, which "
         "neither sum nor stay hidden: use sparsifier none, or random with mask shared)"),
        (conf["quantize"] != "fixed", f"quantize '{conf['quantize']}' (its values are not on a grid every client "
                                      f"shares: use quantize fixed)"),
        (conf["defense"] != "none", f"defense '{conf['defense']}' (it needs each upload, the server sees only the "
                                    f"sum)"),
        (conf["attackers"] > 0, "simulated attackers (the server could not bound a hidden upload's claimed count)"),
        (conf["download"] == "relay", "download 'relay' (it forwards each upload to the clients)"),
        (conf["mode"] == "async", "mode 'async' (FedBuff weighs each upload by its staleness, in floating point)"),
        (conf["k"] < 2, "k 1 (the sum of one upload is that upload)")]
    conflict = next((why for refused, why in conflicts if refused), None)
    if conflict:
        raise ConfigError(f"secure_aggregation cannot be combined with {conflict}")


def check_privacy(conf):
    """DP-FedAvg's accounting assumes Poisson sampling of every client and one release per round: refuse what would
    change who is sampled, or need each upload apart."""
    if not conf["dp_clip"]:
        if first_set(conf, DP_KEYS):
            raise ConfigError(f"config key '{first_set(conf, DP_KEYS)}' acts only with differential privacy: set "
                              f"dp_clip")
        return
    if conf["dp_delta"] >= 1:
        raise ConfigError(f"config key 'dp_delta' must be < 1, got {shown(conf['dp_delta'])}")
    if conf["dp_target_epsilon"] and not conf["dp_noise_multiplier"]:
        raise ConfigError("dp_target_epsilon needs noise: without dp_noise_multiplier epsilon is infinite")
    conflicts = [(conf["mode"] == "async", "mode 'async' (its uploads are not a Poisson sample of the clients)"),
                 (conf["availability"] < 1, "availability below 1 (who is online would change who is sampled, which "
                                            "the accountant does not know)"),
                 (conf["over_select"] > 1, "over_select (the first to finish are kept, not a Poisson sample)"),
                 (conf["deadline"] > 0, "a deadline (dropping the slow changes who contributes)"),
                 (conf["defense"] != "none", f"defense '{conf['defense']}' (DP's clipping bounds each upload; its "
                                             f"noise needs the plain sum)"),
                 (conf["download"] == "relay", "download 'relay' (clients would replay the server's noise)"),
                 (conf["attackers"] > 0, "simulated attackers (an attack's count claim and scale assume the plain "
                                         "sum)")]
    conflict = next((why for refused, why in conflicts if refused), None)
    if conflict:
        raise ConfigError(f"differential privacy (dp_clip) cannot be combined with {conflict}")


def first_set(conf, keys):
    """The first of `keys` that is not at its default, or None."""
    return next((key for key in keys if conf[key] != DEFAULTS[key]), None)


def check_async(conf):
    """FedBuff runs on the simulated clock, with what its staleness-weighted steps can carry."""
    if conf["clock"] != "simulated":
        raise ConfigError("mode 'async' orders its events on the simulated clock: set clock to 'simulated'")
    if conf["concurrency"] > conf["no_models"]:
        raise ConfigError(f"config key 'concurrency' ({conf['concurrency']}) must not exceed 'no_models' "
                          f"({conf['no_models']})")
    if conf["buffer_size"] > conf["concurrency"]:
        raise ConfigError(f"config key 'buffer_size' ({conf['buffer_size']}) must not exceed 'concurrency' "
                          f"({conf['concurrency']}): the buffer would never fill")
    if first_set(conf, ("deadline", "over_select")):
        raise ConfigError(f"config key '{first_set(conf, ('deadline', 'over_select'))}' does not act in mode 'async' "
                          f"(FedBuff waits for no round, and samples one client at a time)")
    if conf["download"] == "relay":
        raise ConfigError("mode 'async' cannot be used with download 'relay': a client replaying the uploads would "
                          "need each one's staleness weight; use download 'compressed' or 'dense'")


def load(path):
    """Read a JSON conf file into a dict (not yet validated)."""
    try:
        with open(path, encoding="utf-8") as f:
            conf = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except ValueError:  # json reads an integer of more than 4300 digits as an error of its own
        raise ConfigError(f"config file {path} holds a number with too many digits") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return conf


def parse_assignment(text):
    """'KEY=VALUE' -> (key, value); VALUE is JSON, or a bare string when it is not JSON."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected KEY=VALUE, got {shown(text)}")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw
    except ValueError:  # json reads an integer of more than 4300 digits as an error of its own
        raise ConfigError(f"config key '{key.strip()}': {shown(raw)} has too many digits") from None
