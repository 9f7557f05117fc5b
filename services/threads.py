"""OS-level names for the services' worker threads, so ``top -H``, py-spy and /proc tell them apart.

Why it exists: before Python 3.14 a thread's name (``ThreadPoolExecutor(thread_name_prefix=...)``)
lives only inside the interpreter; to the kernel every thread of a service is ``python``.  An operator
looking at ``top -H`` and ``prefstream bench scorer`` (which reads each thread's CPU time from
``/proc/<pid>/task/<tid>/stat`` to see how much of the machine reaches the inference threads) both
need the OS name.  :func:`named_executor` gives a pool's threads their Python names as OS names
(Linux ``prctl(PR_SET_NAME)``; best-effort, a no-op elsewhere).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

#: The kernel keeps a thread's name in 16 bytes, the terminating NUL included.
OS_NAME_BYTES = 15
_PR_SET_NAME = 15  # from <linux/prctl.h>
_libc: ctypes.CDLL | None = None


def os_thread_name(name: str) -> str:
    """``name`` as the kernel stores it: UTF-8, cut to 15 bytes (never inside a character)."""
    return name.encode()[:OS_NAME_BYTES].decode(errors="ignore")


def set_os_thread_name(name: str) -> bool:
    """Name the calling thread for the OS; False where that is not possible (not Linux, no libc)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(os_thread_name(name).encode()), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no loadable libc (static or exotic builds): names are a nicety
        log.debug("cannot set OS thread names here", exc_info=True)
        return False


def _name_from_python(niceness: int = 0) -> None:
    set_os_thread_name(threading.current_thread().name)
    if niceness and sys.platform.startswith("linux"):
        try:  # Linux schedules threads on their own: PRIO_PROCESS with a thread id sets that thread's nice
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        except OSError:
            log.debug("cannot renice thread %s", threading.current_thread().name, exc_info=True)


def named_executor(workers: int, prefix: str, *, niceness: int = 0) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads carry their Python name, ``<prefix>_<i>``, as their OS name too, and
    run ``niceness`` lower in the scheduler's eyes (background work that must not delay requests).

    Threads a worker starts (OpenMP's, for instance) inherit the name from it on Linux.
    """
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=_name_from_python,
                                                 initargs=(niceness,))


__all__ = ["OS_NAME_BYTES", "named_executor", "os_thread_name", "set_os_thread_name"]
