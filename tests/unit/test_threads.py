"""OS thread names: cut to the kernel's 15 bytes, and a named pool's threads carry their Python names."""

import sys
import threading
from pathlib import Path

import pytest

from services.threads import named_executor, os_thread_name


def test_os_thread_name_is_cut_to_15_bytes_on_a_character_boundary():
    assert os_thread_name("infer_0") == "infer_0"
    assert os_thread_name("scorer-tokenize_0") == "scorer-tokenize"
    assert os_thread_name("é" * 10) == "é" * 7  # 2 bytes each: the 8th would end at byte 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names are read from /proc")
def test_named_executor_threads_have_os_names():
    ex = named_executor(2, "infer")
    try:
        barrier = threading.Barrier(2)

        def tid() -> int:
            barrier.wait(timeout=10)  # both tasks at once, so both threads exist
            return threading.get_native_id()

        tids = {f.result() for f in [ex.submit(tid) for _ in range(2)]}
        names = {Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in tids}  # while they live
    finally:
        ex.shutdown()
    assert names == {"infer_0", "infer_1"}


def test_a_pool_can_run_niced_below_the_rest_of_the_process() -> None:
    import os
    import sys
    import threading

    import pytest

    from services.threads import named_executor

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice is Linux's")
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with named_executor(1, "bg", niceness=5) as ex:
        niced = ex.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    with named_executor(1, "fg") as ex:
        plain = ex.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert (niced, plain) == (min(19, base + 5), base)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller is untouched
