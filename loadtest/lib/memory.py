#!/usr/bin/env python3
"""Resident memory of deploy/local's replicas, for loadtest/run soak.

  memory.py sample STATE_DIR OUT.json         one sample per replica
  memory.py compare START.json END.json MAX   print growth per replica; exit 1
                                              if any grew by more than MAX
                                              (a fraction: 0.5 = 50%)

A replica's memory is process_resident_memory_bytes from its /metrics
(METRICS_URLS in STATE_DIR/env); when a replica does not export it (an older
binary), VmRSS of its pid (STATE_DIR/pids/cohort-N.pid) from /proc instead.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
import time
import urllib.request
from pathlib import Path


def env_var(state: Path, name: str) -> str:
    for line in (state / "env").read_text().splitlines():
        m = re.match(rf"^(?:export\s+)?{name}=(.*)$", line.strip())
        if m:
            v = shlex.split(m.group(1))
            return v[0] if v else ""
    return ""


def from_metrics(url: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001
        return None
    m = re.search(r"^process_resident_memory_bytes(?:\{[^}]*\})?\s+([0-9.eE+]+)\s*$", text, re.M)
    return float(m.group(1)) if m else None


def from_proc(state: Path, n: int) -> float | None:
    try:
        pid = int((state / "pids" / f"cohort-{n}.pid").read_text().strip())
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def sample(state: Path, out: Path) -> int:
    urls = env_var(state, "METRICS_URLS").split()
    replicas = []
    for i, url in enumerate(urls, start=1):
        rss, source = from_metrics(url), "process_resident_memory_bytes"
        if rss is None:
            rss, source = from_proc(state, i), "/proc VmRSS"
        replicas.append({"replica": url.replace("http://", "").replace("/metrics", ""),
                         "rss_bytes": rss, "source": source})
    out.write_text(json.dumps({"time": time.time(), "replicas": replicas}, indent=2))
    for r in replicas:
        mib = "-" if r["rss_bytes"] is None else f"{r['rss_bytes'] / 2**20:.1f} MiB"
        print(f"  {r['replica']:<22} {mib:>12}  ({r['source']})")
    return 0 if replicas and all(r["rss_bytes"] is not None for r in replicas) else 1


def compare(start: Path, end: Path, max_growth: float) -> int:
    a = {r["replica"]: r["rss_bytes"] for r in json.loads(start.read_text())["replicas"]}
    b = json.loads(end.read_text())
    dt = b["time"] - json.loads(start.read_text())["time"]
    bad = 0
    for r in b["replicas"]:
        s, e = a.get(r["replica"]), r["rss_bytes"]
        if not s or e is None:
            print(f"  {r['replica']:<22} no sample")
            bad += 1
            continue
        growth = e / s - 1
        verdict = "ok" if growth <= max_growth else f"GREW MORE THAN {max_growth:.0%}"
        print(f"  {r['replica']:<22} {s / 2**20:8.1f} MiB -> {e / 2**20:8.1f} MiB in {dt:.0f} s: "
              f"{growth:+.1%}  {verdict}")
        bad += growth > max_growth
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "sample":
        return sample(Path(argv[1]), Path(argv[2]))
    if len(argv) == 4 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]), float(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
