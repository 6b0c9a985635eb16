"""Whether the machine was quiet while a benchmark ran: a speed figure taken beside other work is not one.

On a 2-core machine a second busy process halves a 2-thread job and worse: an OpenMP barrier waits for
a descheduled thread, so a 15 ms decoding step took 444 ms at load average 3.9 (measured 2026-11-30).
`LoadWatch` records, around one benchmark process, the 1-minute load average before and after (what
`uptime` shows; it lags by about a minute and counts the benchmark's own threads) and the CPU time
that *other* processes used meanwhile: all CPUs' busy time from /proc/stat minus the benchmark's own
(its children's rusage). That second figure is immediate and excludes the benchmark itself.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

QUIET_OTHER_CORES = 0.2  # CPU cores other processes kept busy during a run, on average, at most


def busy_cpu_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds all processes have used since boot (user, nice, system, irq, softirq, steal), or
    None where /proc/stat does not exist (not Linux). Source: proc(5), the `cpu` line."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    """The 1-minute load average (runnable and uninterruptible tasks, as `uptime` shows)."""
    return round(os.getloadavg()[0], 2)


class LoadWatch:
    """Around the run of one child process (`with LoadWatch() as watch: subprocess.run(...)`): the load
    average before and after, and the other processes' CPU use, in cores, while it ran."""

    def __enter__(self) -> LoadWatch:
        self.load_before = load_average()
        self._busy = busy_cpu_seconds()
        self._children = _children_cpu_seconds()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        wall = max(time.monotonic() - self._started, 1e-9)
        self.load_after = load_average()
        busy = busy_cpu_seconds()
        own = _children_cpu_seconds() - self._children
        self.other_cores = (
            None if busy is None or self._busy is None else round(max(0.0, busy - self._busy - own) / wall, 2)
        )

    @property
    def quiet(self) -> bool:
        """Other processes used at most QUIET_OTHER_CORES during the run (True where /proc/stat is
        missing). The load average is reported, not judged: it lags by about a minute and, right after
        another benchmark process, still counts that process's threads."""
        return self.other_cores is None or self.other_cores <= QUIET_OTHER_CORES

    def to_dict(self) -> dict[str, float | bool | None]:
        return {
            "load_before": self.load_before,
            "load_after": self.load_after,
            "other_cores": self.other_cores,
            "quiet": self.quiet,
        }


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
