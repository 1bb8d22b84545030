"""Out of memory is never a crash: a batch that does not fit is halved and tried again.

:func:`halving` runs a batch function on a list of items; when the device (a GPU, or the host) runs out of
memory it frees what torch caches, splits the list in two and runs each half the same way, and counts each
split in ``counts["batches_halved"]`` (which the stage's summary reports). One item that does not fit alone is
re-raised as :class:`OutOfMemory`, naming how large it was, for the caller to record as that item's error.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


class OutOfMemory(MemoryError):
    """One item does not fit even alone."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA (or other accelerator) out-of-memory error, its older RuntimeError form, or the host's."""
    if isinstance(error, MemoryError):
        return True
    name = type(error).__name__
    return name == "OutOfMemoryError" or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def first_line(error: BaseException) -> str:
    """What an out-of-memory error says, in one line (torch's messages run on with allocator advice)."""
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def free_cached() -> None:
    """What Python and torch's caching allocator hold and no longer use, given back before a smaller try."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def even_alone(what: str, said: str) -> str:
    """Why one item (``what``) has no result: it ran out of memory even alone (``said``: the error's first line)."""
    return f"out of memory even alone ({what}): {said}"


def attempt(run: Callable[[], T]) -> tuple[T | None, str | None]:
    """``(run(), None)``, or when it runs out of memory ``(None, the error's first line)``, with what the failed
    try allocated given back (outside the ``except`` block, whose error holds its tensors). Other errors go on up."""
    try:
        return run(), None
    except Exception as e:  # noqa: BLE001  only out-of-memory errors are handled; the rest go on up
        if not is_out_of_memory(e):
            raise
        said = first_line(e)  # not the error itself: its traceback holds the failed try's tensors
    free_cached()
    return None, said


def halving(run: Callable[[list], list], items: Sequence, counts: collections.Counter | None = None,
            describe: Callable[[object], str] = lambda item: "one item", ran: list[int] | None = None,
            size: Callable[[list], int] = len) -> list:
    """``run(items)``, or on running out of memory the results of its halves run the same way (in order).
    ``ran``: gets the ``size`` of every part that ran (what fitted, for the batches that come after)."""
    results, said = attempt(lambda: run(list(items)))
    if said is None:
        if ran is not None:
            ran.append(size(list(items)))
        return results
    if len(items) == 1:
        raise OutOfMemory(even_alone(describe(items[0]), said))
    if counts is not None:
        counts["batches_halved"] += 1
    middle = len(items) // 2
    return (halving(run, items[:middle], counts, describe, ran, size)
            + halving(run, items[middle:], counts, describe, ran, size))


def batches(run: Callable[[list], list], items: Sequence, size: int, counts: collections.Counter,
            describe: Callable[[object], str] = lambda item: "one item") -> tuple[list, int]:
    """``run`` over ``items`` ``size`` at a time, each batch through :func:`halving`; after a batch had to be
    halved, the batches after it are no larger than the largest part of it that ran (running out of memory costs
    one failed try, not one per batch). Returns the results in order and the size to use from now on."""
    out: list = []
    start = 0
    while start < len(items):
        batch = list(items[start: start + size])
        ran: list[int] = []
        out += halving(run, batch, counts, describe, ran)
        if len(ran) > 1:  # it was halved: its parts ran
            size = min(size, max(ran))
        start += len(batch)
    return out, size
