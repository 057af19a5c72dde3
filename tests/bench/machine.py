"""What a benchmark needs to know about the machine it runs on: the CPU its own processes used
(from /proc), the CPU everything else used meanwhile (so a figure from a busy machine is
labelled as such), and where processes may run (pinning)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
BUSY_CORES = 0.10
"""Other processes using more than a tenth of a core (or the hypervisor stealing as much) during a
measurement make it a busy machine's figure."""


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (those that ended count for nothing)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def family(pid: int) -> list[int]:
    """The process and its descendants (uvicorn workers, PostgreSQL backends)."""
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return out
    for child in children:
        out += family(int(child))
    return out


def service_pids() -> list[int]:
    """PostgreSQL's and Redis's main processes started by ``.ci/with-services.sh`` for this run."""
    var_dir = os.environ.get("TWINMCP_VAR_DIR")
    if not var_dir:
        return []
    base = Path(var_dir).parent
    pids = []
    for pid_file, line in ((base / "pg" / "postmaster.pid", 0), (base / "redis.pid", 0)):
        try:
            pids.append(int(pid_file.read_text().splitlines()[line]))
        except (FileNotFoundError, IndexError, ValueError):
            continue
    return pids


def _machine_ticks() -> tuple[int, int]:
    """Busy ticks of every core (user, nice, system, irq, softirq) and ticks stolen by the hypervisor."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq, steal


@dataclass
class Load:
    """CPU used on the whole machine during a measurement, split into this run's processes and the rest."""

    ours: list[int]
    started: float = field(default_factory=time.monotonic)
    start_busy: int = 0
    start_steal: int = 0
    start_ours: float = 0.0

    def __post_init__(self) -> None:
        self.start_busy, self.start_steal = _machine_ticks()
        self.start_ours = cpu_seconds(self._all_ours())

    def _all_ours(self) -> list[int]:
        return sorted({pid for root in self.ours for pid in family(root)})

    def result(self) -> dict[str, float]:
        """``other_cores``: cores' worth of CPU used by anything else; ``steal_cores``: taken by the host."""
        elapsed = time.monotonic() - self.started
        busy, steal = _machine_ticks()
        ours = cpu_seconds(self._all_ours()) - self.start_ours
        other = max(0.0, (busy - self.start_busy) / TICKS - ours)
        return {"seconds": elapsed, "ours_cores": ours / elapsed, "other_cores": other / elapsed,
                "steal_cores": (steal - self.start_steal) / TICKS / elapsed}


def is_busy(load: dict[str, float]) -> bool:
    return load["other_cores"] > BUSY_CORES or load["steal_cores"] > BUSY_CORES


def pin_sets(cores: int) -> tuple[set[int], set[int]] | None:
    """With ``--pin``: the gateway on the upper half of the cores, the load generator and the
    upstreams on the lower half; None on a single core."""
    if cores < 2:
        return None
    half = cores // 2
    return set(range(half, cores)), set(range(half))
