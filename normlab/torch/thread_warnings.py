"""Warnings kept from the caller in one thread only.

``warnings.catch_warnings()`` swaps the process's one list of filters: while it is entered,
a thread that trains beside the one that converts (or traces) loses its warnings too, and
two such blocks that overlap in two threads restore each other's lists, which can leave
warnings silenced for good. The filter here ignores a category only in the threads that
entered :func:`ignored_in_this_thread`: it is put first in ``warnings.filters`` while one
is inside, and matches nothing in any other thread. When the last thread leaves, it is taken
out of the list it was put into too, which another thread's ``catch_warnings``, entered
meanwhile, may have saved and then put back.
Ignored warnings are not recorded as shown, so the caller's own later warning of the same
text and place still appears.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import Counter
from typing import Iterator

import torch

_lock = threading.Lock()


def _new_lock_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # (a fork while another thread held it would leave the child's held for good)


os.register_at_fork(after_in_child=_new_lock_in_child)


class _InThreads:
    """A filter's message pattern (``warnings`` calls its ``match``) that matches any text
    in the threads it counts, and nothing elsewhere."""

    def __init__(self) -> None:
        self.threads: Counter = Counter()
        # the lists of filters it was put into: another thread's catch_warnings may have saved one
        # of them meanwhile (and put a copy in its place), to put it back after the last thread is out
        self.lists: list = []

    def match(self, text: str) -> bool:
        return threading.get_ident() in self.threads


_patterns: dict[type, _InThreads] = {}
_once_keepers = 0  # blocks inside torch_once_warnings_unspent(), and torch's setting before the first
_warn_always_before = False


@contextlib.contextmanager
def ignored_in_this_thread(category: type = Warning) -> Iterator[None]:
    """Ignore warnings of ``category`` given in this thread inside the block; other
    threads' warnings are shown as the filters say.

    >>> def warn(): warnings.warn("from the other thread")
    >>> with warnings.catch_warnings(record=True) as shown:
    ...     warnings.simplefilter("always")
    ...     with ignored_in_this_thread():
    ...         warnings.warn("ignored")
    ...         other = threading.Thread(target=warn); other.start(); other.join()
    >>> [str(w.message) for w in shown]
    ['from the other thread']
    """
    thread = threading.get_ident()
    with _lock:
        pattern = _patterns.setdefault(category, _InThreads())
        entry = ("ignore", pattern, category, None, 0)
        if not any(item is entry or item[1] is pattern for item in warnings.filters):
            warnings.filters.insert(0, entry)
            if not any(kept is warnings.filters for kept in pattern.lists):
                pattern.lists.append(warnings.filters)
        pattern.threads[thread] += 1
    try:
        yield
    finally:
        with _lock:
            pattern.threads[thread] -= 1
            if not pattern.threads[thread]:
                del pattern.threads[thread]
            if not pattern.threads:
                for filters in (*pattern.lists, warnings.filters):
                    filters[:] = [item for item in filters if item[1] is not pattern]
                pattern.lists.clear()


@contextlib.contextmanager
def torch_once_warnings_unspent() -> Iterator[None]:
    """Leave torch's once-per-process warnings (``TORCH_WARN_ONCE``) that the block gives
    unspent, so the caller's own later call still gets its warning. torch keeps one switch
    for the process (``torch.set_warn_always``): it is on from the first block entered to
    the last one left, whichever threads they run in, and then as it was. Meanwhile
    another thread's once-per-process warning is given each time rather than once.
    """
    global _once_keepers, _warn_always_before
    with _lock:
        if not _once_keepers:
            _warn_always_before = torch.is_warn_always_enabled()
            torch.set_warn_always(True)
        _once_keepers += 1
    try:
        yield
    finally:
        with _lock:
            _once_keepers -= 1
            if not _once_keepers:
                torch.set_warn_always(_warn_always_before)
