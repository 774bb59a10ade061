"""What one piece of work costs this process: the growth of its peak resident memory and its wall-clock seconds.

Linux keeps a process's peak resident memory (VmHWM in /proc/self/status) and lets the process reset it to the current
resident memory (writing 5 to /proc/self/clear_refs), so the peak of one piece of work is measured with every
allocation in it, numpy's and torch's alike (tracemalloc sees Python's and numpy's only). For the benchmarks, the
fuzz harness and the tests that bound what a decoder allocates.
"""
import time


def resident_kb(field):
    """A memory figure of this process from /proc/self/status, in kB: VmRSS (now) or VmHWM (peak)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def cost(work):
    """(what work() returned, or the Exception it raised; bytes of peak resident memory above the resident memory
    before it; its seconds)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # the peak becomes the resident memory now
    before = resident_kb("VmRSS")
    started = time.perf_counter()
    try:
        outcome = work()
    except Exception as e:  # the caller decides which failures are expected
        outcome = e
    seconds = time.perf_counter() - started
    return outcome, 1024 * (resident_kb("VmHWM") - before), seconds
