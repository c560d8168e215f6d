"""Block-parallel loops for the streaming methods: independent blocks on a small thread pool whose
workers each run torch with one intra-op thread.

Why not torch's own intra-op threads: every op is a fork/join over all cores, so a loop of ~40 small
ops per block waits at ~40 barriers, and on a shared machine one descheduled OpenMP thread stalls the
whole op (measured on the 2-core benchmark box under load: a block loop took 0.58 s with 2 OpenMP
threads and burned 5 s of CPU spinning, 0.17 s with 1). Independent workers pulling blocks from a queue
have no barrier: a stalled worker delays only its own block. Results never depend on the number of
workers or the order blocks finish in (each block writes its own slice; per-block randomness is seeded
by the block's index).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
BLOCK = 1 << 18  # elements per block (1 MB in fp32): a block's ~10 live temporaries stay in cache
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_workers = 0


def workers() -> int:
    """Threads for block loops: the caller's torch thread count when first used (cores by default)."""
    global _workers
    if _workers == 0:
        _workers = max(1, torch.get_num_threads())
    return _workers


def set_workers(n: int) -> None:
    """Use n threads from now on (1: run blocks in the calling thread)."""
    global _pool, _workers
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool, _workers = None, max(1, n)


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                n, thread_name_prefix="merge-block", initializer=torch.set_num_threads, initargs=(1,)
            )
        return _pool


def spans(n: int, block: int = BLOCK):
    """(start, stop) of consecutive blocks covering range(n)."""
    return ((i, min(i + block, n)) for i in range(0, n, block))


def map_blocks(fn: Callable[..., T], spans: Iterable[tuple[int, int]]) -> list[T]:
    """[fn(a, z) for (a, z) in spans], the calls spread over `workers()` threads (in order); in the
    calling thread when that is itself a merge worker (the engine's lanes merge whole tensors, one per
    thread)."""
    spans = list(spans)
    n = workers()
    if n <= 1 or len(spans) < 2 or threading.current_thread().name.startswith("merge-block"):
        return [fn(a, z) for a, z in spans]
    return list(_get_pool(n).map(lambda s: fn(*s), spans))


def run_all(fns: list[Callable[[], T]]) -> list[T]:
    """[f() for f in fns], spread over the workers like blocks."""
    return map_blocks(lambda i, _: fns[i](), [(i, i + 1) for i in range(len(fns))])
