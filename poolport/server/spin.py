"""Brief busy-polling before a blocking wait.

On a virtual machine a sleeping process takes tens of microseconds to wake
(the idle vCPU halts and needs an interrupt), which is the whole budget of a
lock-step call. A process that expects more work soon polls for a little
while first, yielding its CPU to anything runnable on it, the way the Erlang
VM's schedulers busy-wait (``+sbwt``). ``idle_spin_us: 0`` turns it off.
"""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def spin(poll: Callable[[], T], seconds: float) -> T:
    """Call the non-blocking ``poll`` until it returns something truthy or ``seconds`` pass."""
    end = time.perf_counter() + seconds
    while True:
        result = poll()
        if result or time.perf_counter() >= end:
            return result
        os.sched_yield()
