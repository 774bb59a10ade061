"""The simulated clock: what a round costs in seconds, computed from the bytes each client moved, its local steps and
its profile, never from the host's time (config key `clock`: none | simulated).

A sampled client's time in a round is

    download:  its download's bytes * 8 / downlink + latency
    compute:   its local SGD steps * step_seconds * slowness
    upload:    its upload's bytes * 8 / uplink + latency

and it finishes at their sum. A synchronous round waits for every client it keeps: all of them by default; with a
`deadline`, those finished by then; with `over_select` above 1 it samples ceil(k * over_select) and keeps the first k
to finish (ties broken by a seeded order). The round lasts until its last kept client finishes, or until the deadline
when a client is dropped. A dropped client downloaded and trained (its model is in sync) but its upload is discarded;
its bytes are counted apart.

Profiles (`profile`): each client's uplink and downlink (Mbit/s), latency (ms), slowness (a factor on step_seconds)
and availability (the probability it is online in a round), drawn once from a preset's seeded distributions, or read
from a CSV with one row per client. PRESETS names where their numbers come from.
"""
import csv
import math
from dataclasses import dataclass

import numpy as np
import torch

from utils.seeding import derive_seed, generator

CSV_COLUMNS = ("client", "uplink_mbps", "downlink_mbps", "latency_ms", "slowness", "availability")


class ProfileError(ValueError):
    """A profile the clock cannot use: an unknown preset, or a CSV that does not describe the run's clients."""


@dataclass(frozen=True)
class Spread:
    """A log-normal distribution: `median`, and `sigma` of the log (0: every client gets the median). With `tail`, a
    share `tail` of the clients draws from `tail_median` instead (a heavy tail of slow links)."""
    median: float
    sigma: float = 0.0
    tail: float = 0.0
    tail_median: float = 0.0

    def draw(self, rng, count):
        values = self.median * np.exp(self.sigma * rng.standard_normal(count))
        if self.tail:
            slow = rng.random(count) < self.tail
            values[slow] = self.tail_median * np.exp(self.sigma * rng.standard_normal(int(slow.sum())))
        return values


# Medians of links and latency follow the Speedtest Global Index (Ookla, 2024: mobile about 50 Mbit/s down, 10 up,
# 25-30 ms; fixed broadband about 90 down, 40 up, 10 ms); the mobile tail follows the slow uplinks of FedScale's
# device traces (Lai et al., ICML 2022) and the 2 Mbit/s phone of the issue that asked for this clock. Slowness is a
# factor on this machine's step (a 2-core x86 server): a datacenter node is 4 times faster, a laptop on Wi-Fi as
# fast, a phone 3 times slower with a wide spread; these are our assumptions, ordered as FedScale's compute traces
# (AI Benchmark) order devices, not measurements of ours.
PRESETS = {
    "datacenter": {"uplink": Spread(10_000), "downlink": Spread(10_000), "latency": Spread(0.5),
                   "slowness": Spread(0.25)},
    "wifi": {"uplink": Spread(40, 0.6), "downlink": Spread(90, 0.6), "latency": Spread(10, 0.4),
             "slowness": Spread(1.0, 0.3)},
    "mobile": {"uplink": Spread(10, 0.8, tail=0.2, tail_median=2), "downlink": Spread(50, 0.8),
               "latency": Spread(30, 0.4), "slowness": Spread(3.0, 0.5)},
}
MIXED = ("wifi", "mobile")  # 'mixed': each client is drawn from one of these, with equal chance


class Profiles:
    """Per client: uplink and downlink in bits/s, latency in s, slowness, availability; numpy float64 arrays (five
    floats per client: 100,000 clients take 4 MB)."""

    def __init__(self, uplink_mbps, downlink_mbps, latency_ms, slowness, availability):
        self.uplink = np.asarray(uplink_mbps, dtype=np.float64) * 1e6
        self.downlink = np.asarray(downlink_mbps, dtype=np.float64) * 1e6
        self.latency = np.asarray(latency_ms, dtype=np.float64) / 1e3
        self.slowness = np.asarray(slowness, dtype=np.float64)
        self.availability = np.asarray(availability, dtype=np.float64)

    @classmethod
    def preset(cls, name, clients, seed, availability):
        """The profiles of `clients` clients drawn from preset `name` ('mixed': wifi or mobile each), seeded."""
        rng = np.random.default_rng(derive_seed(seed, "profile", name))
        drawn = {}
        for key in PRESETS["wifi"]:
            if name == "mixed":
                mobile = rng.random(clients) < 0.5
                values = PRESETS["wifi"][key].draw(rng, clients)
                values[mobile] = PRESETS["mobile"][key].draw(rng, clients)[mobile]
            else:
                values = PRESETS[name][key].draw(rng, clients)
            drawn[key] = values
        return cls(drawn["uplink"], drawn["downlink"], drawn["latency"], drawn["slowness"],
                   np.full(clients, float(availability)))

    @classmethod
    def read_csv(cls, path, clients):
        """The profiles in CSV `path`: the header CSV_COLUMNS and one row per client 0 .. clients-1, in any order.
        ProfileError names the first line that is not so."""
        values = np.full((clients, len(CSV_COLUMNS) - 1), np.nan)
        seen = np.zeros(clients, dtype=bool)
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None or [h.strip() for h in header] != list(CSV_COLUMNS):
                    raise ProfileError(f"profile {path}: the header must be {','.join(CSV_COLUMNS)}, got "
                                       f"{','.join(header or [])[:200]!r}")
                for row in reader:
                    line = reader.line_num
                    if len(row) != len(CSV_COLUMNS):
                        raise ProfileError(f"profile {path} line {line}: {len(row)} cells, expected "
                                           f"{len(CSV_COLUMNS)}")
                    client = parse_client(row[0], clients, f"profile {path} line {line}")
                    if seen[client]:
                        raise ProfileError(f"profile {path} line {line}: client {client} appears twice")
                    seen[client] = True
                    values[client] = [parse_number(cell, name, f"profile {path} line {line}")
                                      for cell, name in zip(row[1:], CSV_COLUMNS[1:])]
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e.strerror or e}") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise ProfileError(f"profile {path} is not a CSV file of text ({e})") from None
        if not seen.all():
            raise ProfileError(f"profile {path} has no row for client {int(np.flatnonzero(~seen)[0])} (the run has "
                               f"{clients} clients, 0 to {clients - 1})")
        return cls(*values.T)

    @classmethod
    def for_run(cls, conf):
        """The run's profiles, or None when it has no clock. Raises ProfileError."""
        if conf["clock"] == "none":
            return None
        if conf["profile"] in PRESETS or conf["profile"] == "mixed":
            return cls.preset(conf["profile"], conf["no_models"], conf["seed"], conf["availability"])
        return cls.read_csv(conf["profile"], conf["no_models"])

    def online(self, seed, round_index):
        """The ids of the clients online in round `round_index` (a seeded draw per client), or None when every client
        always is."""
        if (self.availability >= 1).all():
            return None
        draw = torch.rand(len(self.availability), generator=generator(seed, "online", round_index),
                          dtype=torch.float64).numpy()
        return np.flatnonzero(draw < self.availability)

    def times(self, client, download_bytes, steps, upload_bytes, step_seconds):
        """(download, compute, upload) seconds of `client` in a round."""
        return (download_bytes * 8 / self.downlink[client] + self.latency[client],
                steps * step_seconds * self.slowness[client],
                upload_bytes * 8 / self.uplink[client] + self.latency[client])


def parse_client(text, clients, where):
    try:
        client = int(text)
    except ValueError:
        raise ProfileError(f"{where}: client {text[:40]!r} is not an integer") from None
    if not 0 <= client < clients:
        raise ProfileError(f"{where}: client {client} is not one of the run's {clients} (0 to {clients - 1})")
    return client


def parse_number(text, name, where):
    """A profile's value: positive and finite (latency may be 0, availability lies in [0, 1])."""
    try:
        value = float(text)
    except ValueError:
        raise ProfileError(f"{where}: {name} {text[:40]!r} is not a number") from None
    low_ok = name in ("latency_ms", "availability")
    if not math.isfinite(value) or value < 0 or (value == 0 and not low_ok) or (name == "availability" and value > 1):
        bound = "in [0, 1]" if name == "availability" else "at least 0" if low_ok else "above 0"
        raise ProfileError(f"{where}: {name} must be finite and {bound}, got {text[:40]!r}")
    return value


@dataclass
class Timing:
    """One client's round on the clock."""
    client: int
    download_bytes: int
    steps: int
    upload_bytes: int
    download_s: float
    compute_s: float
    upload_s: float
    arrived: bool = True  # False: dropped, its upload discarded

    @property
    def finish_s(self):
        return self.download_s + self.compute_s + self.upload_s


def elapsed(before, round_seconds):
    """The simulated time after a round of `round_seconds` that started at `before` (as metrics.csv writes it)."""
    return round(before + round_seconds, 6)


def may_drop(conf):
    """Whether a sampled client's upload may be discarded: a deadline, or more clients sampled than kept."""
    return conf["clock"] != "none" and (conf["deadline"] > 0 or conf["over_select"] > 1)


class Clock:
    """A run's simulated clock: its clients' profiles and local steps per round."""

    def __init__(self, conf, steps):
        self.conf = conf
        self.profiles = Profiles.for_run(conf)
        self.steps = steps  # per client, its local SGD steps in a round

    def online(self, round_index):
        return self.profiles.online(self.conf["seed"], round_index)

    def sampled(self):
        """How many clients a round samples: ceil(k * over_select), at most every client."""
        wanted = math.ceil(round(self.conf["k"] * self.conf["over_select"], 9))  # 10 * 1.1 is 11.000000000000002
        return min(wanted, self.conf["no_models"])

    def play(self, round_index, sizes):
        """Time a synchronous round from `sizes`: (client, download bytes, upload bytes) per sampled client."""
        return play(self.profiles, self.conf, round_index,
                    [(client, down, self.steps[client], up) for client, down, up in sizes], self.conf["k"])

    def play_one(self, client, download_bytes, upload_bytes):
        """The Timing of one client (FedBuff's, which starts and arrives on its own)."""
        return time_client(self.profiles, self.conf, (client, download_bytes, self.steps[client], upload_bytes))


def time_client(profiles, conf, record):
    """The Timing of a client's `record`: (client, download bytes, local steps, upload bytes)."""
    return Timing(*record, *map(float, profiles.times(*record, conf["step_seconds"])))


def play(profiles, conf, round_index, records, keep):
    """Time a synchronous round. `records`: (client, download bytes, local steps, upload bytes) per sampled client;
    `keep`: how many to keep at most (k). Returns (the Timings, in the records' order, each marked kept or dropped;
    the round's seconds)."""
    timings = [time_client(profiles, conf, record) for record in records]
    ties = torch.randperm(len(timings), generator=generator(conf["seed"], "finish ties", round_index)).tolist()
    order = sorted(range(len(timings)), key=lambda i: (timings[i].finish_s, ties[i]))
    deadline = conf["deadline"] or math.inf
    kept = [i for i in order if timings[i].finish_s <= deadline][:keep]
    for i in set(range(len(timings))) - set(kept):
        timings[i].arrived = False
    if len(kept) < len(timings) and len(kept) < keep:  # someone missed the deadline: the round waited for it
        return timings, deadline
    return timings, max((timings[i].finish_s for i in kept), default=0.0)
