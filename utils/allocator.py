"""Freed memory kept in the process for the next allocation: set by the command line (main.py) and by the benchmarks
that time what it runs.

glibc's malloc often hands freed blocks of a few hundred KB and more back to the kernel (it unmaps those above a
threshold that adapts, and trims its heap's free top), so a client's model-sized tensors (its diff, its residual, the
selection's scratch) come as new pages, a page fault for each 4 KB. At 1000 clients and 100 per round (STC with error
feedback, the Fashion-MNIST CNN) that was 850 page faults a client; kept, 150 to 300, and a round 18% faster on this
project's virtual machines, whose host takes back the memory the kernel frees (a fault there costs 3.4 us). The peak
resident memory grew 9%, 1843 to 2016 MB.
"""
import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # bytes: blocks under it come from the heap; glibc refuses more on 64-bit
TRIM_THRESHOLD = 1 << 30  # bytes: the heap's free top is handed back only past it


def keep_freed_memory():
    """Have malloc serve blocks under 32 MB from its heap and keep what is freed there; True where it took effect,
    False where the C library has no mallopt (macOS) or refuses it."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return bool(mallopt) and all([mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)])
