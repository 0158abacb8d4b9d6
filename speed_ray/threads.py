"""How many threads torch uses inside a CPU training worker (pure but for the one torch call).

Ray starts a worker that asks for {"CPU": c} with OMP_NUM_THREADS=c (1 by default), so a single CPU training
worker on a 2-core machine leaves a core idle however long the step. `torch_threads` in a trainer's config says
how many threads each CPU worker uses; None keeps the worker's CPU share (at least 1). A GPU worker is left as
it is. Threads change speed, not results, so the setting is outside the stages' fingerprints.
"""

from __future__ import annotations


def worker_threads(torch_threads: int | None, cpus_per_worker: float) -> int:
    """The thread count for a CPU worker: the explicit setting, else its CPU share rounded down (at least 1)."""
    if torch_threads is not None:
        if torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or null, got {torch_threads}")
        return int(torch_threads)
    return max(1, int(cpus_per_worker))


def set_worker_threads(torch_threads: int | None, cpus_per_worker: float, use_gpu: bool) -> int | None:
    """Apply worker_threads in this process (a CPU worker only). Returns the threads set, or None on a GPU."""
    if use_gpu:
        return None
    import torch

    n = worker_threads(torch_threads, cpus_per_worker)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
