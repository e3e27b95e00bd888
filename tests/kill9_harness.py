"""``kill -9`` at random moments, fast: the engine runs in a forked child of the test process (torch and fedpeft are
already imported, so a child starts in milliseconds), the parent sends it SIGKILL after a random delay, and starts
the next child, until at least ``kills`` children died that way and one ran to its end.

Every process this harness starts is stopped by it, by pid (``finally``).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Callable, List

LEFTOVER_SUFFIXES = (".tmp",)


def kill_loop(work: Callable[[bool], None], *, kills: int = 20, seed: int = 0, max_delay: float = 0.5,
              timeout: float = 120.0) -> List[float]:
    """Run ``work(final)`` in forked children: the first ``kills`` (``final=False``: they should run on and on) are
    SIGKILLed after ``uniform(0, max_delay)`` seconds, then one (``final=True``) runs to its end. Returns the delays
    of the kills."""
    rng, delays = random.Random(seed), []
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"kill loop: only {len(delays)} kills within {timeout:.0f}s")
        final = len(delays) >= kills
        delay = rng.uniform(0.0, max_delay)
        pid = os.fork()
        if pid == 0:  # the child: do the work, never return into pytest
            code = 1
            try:
                work(final)
                code = 0
            except BaseException:  # pragma: no cover - reported by the exit status
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        try:
            if final:
                _, status = os.waitpid(pid, 0)
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the last child failed: {status}"
                return delays
            end = time.monotonic() + delay
            while time.monotonic() < end:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    raise AssertionError(f"a child that should run on ended by itself (status {status})")
                time.sleep(0.002)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                delays.append(delay)
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def leftovers(root: Path) -> List[str]:
    """Temporary files anywhere under ``root`` (fedpeft's ``.<name>.<hex>.tmp``, safetensors' ``.tmpXXXXXX``)."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if p.is_file() and (p.name.endswith(LEFTOVER_SUFFIXES) or p.name.startswith(".tmp")))


def logged_exactly_once(log: Path, ckpt: Path) -> List[dict]:
    """The round log's rows, after checking that they are rounds 0, 1, ... once each, equal to the checkpoint's
    history (the oracle of what ran)."""
    from fedpeft.protocols import RoundLog, load_checkpoint

    done = load_checkpoint(ckpt).round
    rows = RoundLog.read(log)
    assert [r["round"] for r in rows] == list(range(done))
    assert rows == load_checkpoint(ckpt).meta["history"]
    return rows
