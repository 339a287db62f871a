"""Compare two cProfile runs of the app (`run.py --cprofile --targets app,app@OTHER`) call by call.

    uv run python bench/profile_diff.py bench/results/app-perf-old-throughput.prof \\
        bench/results/app-throughput.prof

Call counts are exact whatever else the machine is doing, so they show work that was added or
removed per reply; own time is shown beside them (inflated by cProfile, and noisy, but in
proportion between the two). Functions are matched by path inside the checkout (or inside
site-packages), line numbers ignored, so the same function in two checkouts lines up.
"""

from __future__ import annotations

import argparse
import pstats
from collections import defaultdict


def _where(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    for top in ("/chat/", "/web/", "/components/", "/main.py"):
        if top in file:
            return top.lstrip("/") + file.split(top, 1)[1]
    return file


def load(path: str) -> dict[tuple[str, str], tuple[int, float, float]]:
    """(file, function) -> (calls, own seconds, cumulative seconds), line numbers merged."""
    out: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0, 0.0])
    for (file, _line, fn), (_cc, nc, tt, ct, _callers) in pstats.Stats(path).stats.items():
        row = out[(_where(file), fn)]
        row[0] += nc
        row[1] += tt
        row[2] += ct
    return {k: tuple(v) for k, v in out.items()}


def main() -> None:
    """Print the functions whose calls or own time changed most from `old` to `new`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    old, new = load(args.old), load(args.new)
    total_old = sum(v[1] for v in old.values())
    total_new = sum(v[1] for v in new.values())
    print(f"own time in all: old {total_old:.2f} s, new {total_new:.2f} s")
    keys = set(old) | set(new)
    zero = (0, 0.0, 0.0)

    def show(title: str, rows: list) -> None:
        print(f"\n== {title} ==")
        print(f"{'calls old':>10} {'calls new':>10} {'own old':>8} {'own new':>8}  function")
        for k in rows[: args.top]:
            o, n = old.get(k, zero), new.get(k, zero)
            print(f"{o[0]:>10} {n[0]:>10} {o[1]:>8.3f} {n[1]:>8.3f}  {k[0]}:{k[1]}")

    show("own time added", sorted(keys, key=lambda k: old.get(k, zero)[1] - new.get(k, zero)[1]))
    show("calls added", sorted(keys, key=lambda k: old.get(k, zero)[0] - new.get(k, zero)[0]))


if __name__ == "__main__":
    main()
