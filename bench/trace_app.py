"""Run the app with tracemalloc; SIGUSR1 writes where its memory went to bench/results/.

A diagnostic for the `streams` scenario (`run.py --scenario streams --tracemalloc`). The runner
sends SIGUSR2 after the warm-up, which starts tracing (so start-up and imports, the same for any
number of streams, are neither traced nor slowed), and SIGUSR1 once all streams are open: what
is traced then is what the streams hold. Tracing slows the app down, so its other figures from
such a run mean nothing.
"""

import gc
import os
import signal
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "tracemalloc.txt"


# Frames kept per allocation (TRACE_FRAMES): 1 is cheap; 0 traces nothing and only reports
# what the garbage collector finds at the peak.
FRAMES = int(os.environ.get("TRACE_FRAMES", "1"))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(signum, frame) -> None:
    """Start tracing (after the warm-up)."""
    if FRAMES:
        tracemalloc.start(FRAMES)


def dump(signum, frame) -> None:
    """Write the largest allocation sites, by file, by line and by traceback."""
    before = _rss_mb()
    found = gc.collect()
    lines = [
        f"RSS {before:.1f} MB; a full garbage collection then found {found} unreachable objects"
        f" (RSS after: {_rss_mb():.1f} MB); gc counts {gc.get_count()}"
    ]
    if not FRAMES:
        OUT.write_text("\n".join(lines) + "\n")
        return
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    total = sum(s.size for s in snap.statistics("filename"))
    lines.append(f"traced: {total / 2**20:.1f} MB")
    for key, n in (("filename", 25), ("lineno", 30)):
        lines.append(f"\n== top {n} by {key} ==")
        for stat in snap.statistics(key)[:n]:
            frame0 = stat.traceback[0]
            where = frame0.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            where += f":{frame0.lineno}" if key == "lineno" else ""
            lines.append(f"{stat.size / 2**20:8.1f} MB {stat.count:9d} blocks  {where}")
    lines.append("\n== top 25 by traceback ==")
    for stat in snap.statistics("traceback")[:25]:
        lines.append(f"{stat.size / 2**20:8.1f} MB {stat.count:9d} blocks")
        for fr in stat.traceback[-8:]:
            where = fr.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            lines.append(f"      {where}:{fr.lineno}")
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGUSR2, start)
    signal.signal(signal.SIGUSR1, dump)
    import main

    main.serve([])
