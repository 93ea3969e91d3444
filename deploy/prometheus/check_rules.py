#!/usr/bin/env python3
"""Check that every alert of rules.yml is documented and has a runbook section.

  check_rules.py [--rules deploy/prometheus/rules.yml] [--runbook docs/runbook.md]

Every alert must have a `severity` label (warning or critical) and the
annotations `summary`, `description` and `runbook_url`; the runbook_url must
be RUNBOOK_BASE + '#' + an anchor that is a heading of docs/runbook.md (the
anchor GitHub renders for it), and every runbook section named like an alert
(`## Cohort...`) must belong to an existing alert, so that neither side
drifts; in-page links (#anchor) must resolve too. Prints "N passed, N failed"; exit 1 on any failure. Needs PyYAML.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK_BASE = "https://github.com/cohort/cohort/blob/main/docs/runbook.md"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading (without the -N of duplicates)."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)  # drop punctuation, keep letters, digits, _, -, space
    return s.replace(" ", "-")


def headings(markdown: str) -> list[str]:
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            out.append(m.group(2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", default=str(ROOT / "deploy/prometheus/rules.yml"))
    ap.add_argument("--runbook", default=str(ROOT / "docs/runbook.md"))
    a = ap.parse_args()

    rules = yaml.safe_load(Path(a.rules).read_text())
    heads = headings(Path(a.runbook).read_text())
    anchors = {github_anchor(h) for h in heads}
    passed = failed = 0

    def check(ok: bool, what: str) -> None:
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL  {what}")

    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    check(len(alerts) > 0, f"{a.rules} defines alerts")
    names = set()
    for r in alerts:
        n = r["alert"]
        check(n not in names, f"{n}: alert name is unique")
        names.add(n)
        ann = r.get("annotations") or {}
        check((r.get("labels") or {}).get("severity") in ("warning", "critical"),
              f"{n}: severity label warning or critical")
        for key in ("summary", "description", "runbook_url"):
            check(bool(str(ann.get(key, "")).strip()), f"{n}: has a {key} annotation")
        url = str(ann.get("runbook_url", ""))
        base, _, anchor = url.partition("#")
        check(base == RUNBOOK_BASE, f"{n}: runbook_url starts with {RUNBOOK_BASE}# ({url})")
        check(anchor in anchors, f"{n}: runbook anchor #{anchor} is a heading of {a.runbook}")
        check(anchor == github_anchor(n), f"{n}: runbook anchor is the alert's own section (#{github_anchor(n)})")
    for h in heads:
        if re.fullmatch(r"Cohort[A-Za-z0-9]+", h.strip()):
            check(h.strip() in names, f"{a.runbook}: section '{h}' belongs to an alert of {a.rules}")
    for link in sorted(set(re.findall(r"\]\(#([^)]+)\)", Path(a.runbook).read_text()))):
        check(link in anchors, f"{a.runbook}: in-page link #{link} has a heading")
    print(f"alerts and runbook: {len(alerts)} alerts; {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
