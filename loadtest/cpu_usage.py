#!/usr/bin/env python3
"""CPU used by each deploy/local component over a load run.

  cpu_usage.py snapshot STATE_DIR OUT.json [PID] record cumulative CPU times
                                                (PID: a shell whose reaped children,
                                                i.e. k6, are counted as `k6`)
  cpu_usage.py diff BEFORE.json AFTER.json      print CPU seconds per component
                                                and average cores used

Components are the pids in STATE_DIR/pids (plus their child processes, so a
Postgres postmaster includes its backends), and `k6`: the CPU time of the children PID has reaped (k6 has exited by the
second snapshot, so it is measured through its parent's cutime/cstime).
Backends that exited between the snapshots are not counted.
"""
import json
import os
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def proc_times(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


def children() -> dict:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    return kids


def tree(pid: int, kids: dict) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def snapshot(state: str, parent: str | None = None) -> dict:
    kids = children()
    snap = {"t": time.time(), "components": {}}
    for f in sorted(Path(state, "pids").glob("*.pid")):
        pid = int(f.read_text().strip())
        snap["components"][f.stem] = {str(p): proc_times(p) for p in tree(pid, kids)}
    k6 = {}
    if parent:
        try:
            f = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()
            k6["children"] = (int(f[13]) + int(f[14])) / TICK  # cutime + cstime
        except (OSError, IndexError, ValueError):
            pass
    snap["components"]["k6"] = k6
    return snap


def diff(a: dict, b: dict) -> None:
    wall = b["t"] - a["t"]
    groups: dict[str, float] = {}
    for name, procs in b["components"].items():
        before = a["components"].get(name, {})
        used = sum(t - before.get(p, 0.0) for p, t in procs.items())
        key = "cohort (3 replicas)" if name.startswith("cohort-") else name
        groups[key] = groups.get(key, 0.0) + used
    total = sum(groups.values())
    print(f"CPU over {wall:.0f} s of wall time (2 cores = {2 * wall:.0f} CPU-s available):")
    for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {k:22s} {v:8.1f} CPU-s  {v / wall:5.2f} cores")
    print(f"  {'total':22s} {total:8.1f} CPU-s  {total / wall:5.2f} cores")


if __name__ == "__main__":
    if sys.argv[1] == "snapshot":
        Path(sys.argv[3]).write_text(json.dumps(snapshot(sys.argv[2], sys.argv[4] if len(sys.argv) > 4 else None)))
    else:
        diff(json.loads(Path(sys.argv[2]).read_text()), json.loads(Path(sys.argv[3]).read_text()))
