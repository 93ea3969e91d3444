#!/usr/bin/env python3
"""Test the inhibitions of deploy/prometheus/alertmanager.yml on a real Alertmanager.

  alertmanager_test.py [--config alertmanager.yml] [--cases alertmanager_test.yml]

Starts a private Alertmanager (Debian's `prometheus-alertmanager`) on a free
127.0.0.1 port with a temporary storage dir and clustering off, and for each
case of alertmanager_test.yml posts its alerts, reads them back from the API
and checks which are inhibited; then resolves them before the next case.
It also checks that every alert name the config and the cases mention is an
alert of rules.yml, so a renamed alert cannot silently escape an inhibition.

Prints one line per check and "N passed, N failed"; exit 1 on any failure.
Stops the Alertmanager it started (by pid) however it ends. Needs PyYAML.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def names_in_matcher(m: str) -> set[str]:
    """Alert names a matcher string like alertname=~"A|B" mentions."""
    x = re.match(r'\s*alertname\s*(=~|=|!=|!~)\s*"?([^"]*)"?\s*$', m)
    if not x or x.group(1) not in ("=", "=~"):
        return set()
    return {n for n in re.split(r"\|", x.group(2)) if n}


class Report:
    def __init__(self) -> None:
        self.passed = self.failed = 0

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.failed += 1
            print(f"  FAIL  {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "alertmanager.yml"))
    ap.add_argument("--cases", default=str(HERE / "alertmanager_test.yml"))
    ap.add_argument("--rules", default=str(HERE / "rules.yml"))
    ap.add_argument("--binary", default=shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"))
    a = ap.parse_args()
    r = Report()

    config = yaml.safe_load(Path(a.config).read_text())
    cases = yaml.safe_load(Path(a.cases).read_text())["cases"]
    rules = yaml.safe_load(Path(a.rules).read_text())
    alerts_defined = {x["alert"] for g in rules["groups"] for x in g["rules"] if "alert" in x}

    print("[names: every alert the inhibitions and cases mention exists in rules.yml]")
    for i, rule in enumerate(config.get("inhibit_rules") or []):
        for side in ("source_matchers", "target_matchers"):
            for m in rule.get(side) or []:
                for n in names_in_matcher(m):
                    r.check(n in alerts_defined, f"inhibit_rules[{i}].{side}: {n} is an alert of rules.yml")
    for c in cases:
        for al in c["alerts"]:
            n = al["labels"]["alertname"]
            r.check(n in alerts_defined, f"case '{c['name']}': {n} is an alert of rules.yml")

    if not a.binary:
        print("  FAIL  no prometheus-alertmanager binary (apt-get install prometheus-alertmanager)")
        return 1
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="am-test-")
    log = open(Path(tmp) / "alertmanager.log", "w")
    proc = subprocess.Popen(
        [a.binary, f"--config.file={a.config}", f"--storage.path={tmp}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).read()
                break
            except Exception:  # noqa: BLE001
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    print("  FAIL  Alertmanager did not start:\n" + (Path(tmp) / "alertmanager.log").read_text())
                    return 1
                time.sleep(0.2)

        for c in cases:
            print(f"[{c['name']}]")
            now = dt.datetime.now(dt.timezone.utc)
            posted = [{"labels": al["labels"], "annotations": {"summary": "test"},
                       "startsAt": iso(now - dt.timedelta(minutes=1)),
                       "endsAt": iso(now + dt.timedelta(minutes=10))} for al in c["alerts"]]
            call(f"{base}/api/v2/alerts", "POST", posted)
            want = {json.dumps(al["labels"], sort_keys=True): al["inhibited"] for al in c["alerts"]}
            # The inhibitor learns of new alerts asynchronously: wait until the
            # answer is complete and the same on two reads in a row.
            got, prev = {}, None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.4)
                got = {}
                for x in call(f"{base}/api/v2/alerts?active=true&silenced=true&inhibited=true&unprocessed=true"):
                    key = json.dumps(x["labels"], sort_keys=True)
                    if key in want:
                        got[key] = (x["status"]["state"], bool(x["status"].get("inhibitedBy")))
                settled = len(got) == len(want) and all(s != "unprocessed" for s, _ in got.values())
                if settled and got == prev:
                    break
                prev = got
            for al in c["alerts"]:
                key = json.dumps(al["labels"], sort_keys=True)
                state = got.get(key)
                desc = ",".join(f"{k}={v}" for k, v in al["labels"].items() if k != "severity")
                expect = "inhibited" if al["inhibited"] else "notified"
                actual = "missing" if state is None else ("inhibited" if state[1] else state[0])
                r.check(state is not None and state[1] == al["inhibited"],
                        f"{desc}: {expect}" + ("" if state is not None and state[1] == al["inhibited"] else f" (got {actual})"))
            # Resolve them so that they inhibit nothing in the next case.
            past = iso(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))
            for p in posted:
                p["endsAt"] = past
            call(f"{base}/api/v2/alerts", "POST", posted)
            time.sleep(0.3)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"alertmanager inhibitions: {r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
