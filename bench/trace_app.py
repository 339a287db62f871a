"""Run the app with tracemalloc on; SIGUSR1 writes where its memory is to bench/results/.

A diagnostic for the `streams` scenario (`run.py --scenario streams --tracemalloc`): the runner
sends SIGUSR1 once all streams are open. Tracing slows the app down, so its other figures from
such a run mean nothing.
"""

import os
import signal
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "tracemalloc.txt"


def dump(signum, frame) -> None:
    """Write the largest allocation sites, by file, by line and by traceback."""
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    total = sum(s.size for s in snap.statistics("filename"))
    lines = [f"traced: {total / 2**20:.1f} MB"]
    for key, n in (("filename", 25), ("lineno", 30)):
        lines.append(f"\n== top {n} by {key} ==")
        for stat in snap.statistics(key)[:n]:
            frame0 = stat.traceback[0]
            where = frame0.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            where += f":{frame0.lineno}" if key == "lineno" else ""
            lines.append(f"{stat.size / 2**20:8.1f} MB {stat.count:9d} blocks  {where}")
    lines.append("\n== top 12 by traceback ==")
    for stat in snap.statistics("traceback")[:12]:
        lines.append(f"{stat.size / 2**20:8.1f} MB {stat.count:9d} blocks")
        for fr in stat.traceback[-8:]:
            where = fr.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            lines.append(f"      {where}:{fr.lineno}")
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    tracemalloc.start(6)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGUSR1, dump)
    import main

    main.serve([])
