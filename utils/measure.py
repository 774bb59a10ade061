"""What one piece of work costs this process: the growth of its peak resident memory and its wall-clock seconds.

Linux keeps a process's peak resident memory (VmHWM in /proc/self/status) and lets the process reset it to the current
resident memory (writing 5 to /proc/self/clear_refs), so the peak of one piece of work is measured with every
allocation in it, numpy's and torch's alike (tracemalloc sees Python's and numpy's only). For the benchmarks, the
fuzz harness and the tests that bound what a decoder allocates.
"""
import time
import traceback


def resident_kb(field):
    """A memory figure of this process from /proc/self/status, in kB: VmRSS (now) or VmHWM (peak)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def cost(work):
    """(what work() returned, or the Exception it raised; bytes of peak resident memory above the resident memory
    before it; its wall-clock seconds; the CPU seconds this process spent on it, every thread's: what other processes
    on a shared machine take does not count there)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # the peak becomes the resident memory now
    before = resident_kb("VmRSS")
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        outcome = work()
    except Exception as e:  # the caller decides which failures are expected
        # its frames' locals let go: kept with the traceback, which refers to this frame and so to itself, the arrays
        # of the work that raised lived until a garbage collection (gigabytes over a fuzzing run)
        traceback.clear_frames(e.__traceback__)
        outcome = e
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return outcome, 1024 * (resident_kb("VmHWM") - before), seconds, cpu_seconds
