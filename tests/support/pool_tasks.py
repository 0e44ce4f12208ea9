"""Tasks for the resilient pool's tests; top level so spawned workers can import them."""

import os
import time


def square_or_misbehave(x: int) -> int:
    if x == 13:
        os._exit(7)  # a worker that dies (as a segfault in a C extension would)
    if x == 21:
        time.sleep(60)  # a worker that hangs
    if x == 5:
        raise ValueError("five is a bad number")
    return x * x
