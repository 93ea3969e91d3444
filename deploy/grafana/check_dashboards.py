#!/usr/bin/env python3
"""Check cohort's Grafana dashboards, statically or against a live Prometheus.

  check_dashboards.py lint  [DASHBOARD.json ...]
      every file parses as JSON, has a non-empty uid (unique across files), a
      `datasource` template variable, every panel/target uses ${datasource}
      rather than a hard-coded datasource, and every target and annotation
      expr parses as PromQL: the exprs (Grafana variables substituted) are
      written as recording rules to a temp file and `promtool check rules`
      runs on it.

  check_dashboards.py query [--url http://127.0.0.1:19090] [--range 15m]
                            [--allow-empty TITLE-SUBSTRING ...] [DASHBOARD.json ...]
      runs every panel expr as an instant query against Prometheus' HTTP API
      and reports which return data; exit 1 if any (not allowed) is empty.

Without file arguments both use deploy/grafana/dashboards/*.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def substitute(expr: str, rng: str = "15m") -> str:
    """Replace Grafana's variables with values Prometheus accepts."""
    for k, v in {
        "$__rate_interval": "1m", "${__rate_interval}": "1m",
        "$__interval": "15s", "${__interval}": "15s",
        "$__range": rng, "${__range}": rng,
        "${instance:regex}": ".*", "${instance}": ".*", "$instance": ".*",
    }.items():
        expr = expr.replace(k, v)
    return expr


def panels_of(dash: dict):
    for p in dash.get("panels", []):
        yield p
        for sub in p.get("panels", []) or []:
            yield sub


def targets_of(dash: dict):
    for p in panels_of(dash):
        for t in p.get("targets", []) or []:
            if t.get("expr"):
                yield p, t


def annotations_of(dash: dict):
    """Query annotations (Grafana's built-in "Annotations & Alerts" has no expr
    and a grafana datasource: skipped)."""
    for a in (dash.get("annotations") or {}).get("list", []) or []:
        if (a.get("datasource") or {}).get("type") == "grafana" or a.get("builtIn"):
            continue
        yield a


def files(args: list[str]) -> list[Path]:
    return [Path(a) for a in args] or sorted((HERE / "dashboards").glob("*.json"))


def lint(paths: list[Path]) -> int:
    errors: list[str] = []
    uids: dict[str, Path] = {}
    rules = {"groups": []}
    n_exprs = 0
    n_annotations = 0
    for path in paths:
        try:
            dash = json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001
            errors.append(f"{path}: does not parse: {e}")
            continue
        uid = dash.get("uid")
        if not uid:
            errors.append(f"{path}: no uid")
        elif uid in uids:
            errors.append(f"{path}: uid {uid} also used by {uids[uid]}")
        else:
            uids[uid] = path
        tvars = {v.get("name"): v for v in (dash.get("templating") or {}).get("list", [])}
        if tvars.get("datasource", {}).get("type") != "datasource":
            errors.append(f"{path}: no `datasource` template variable of type datasource")
        group = {"name": f"dashboard_{uid or path.stem}", "rules": []}
        for p in panels_of(dash):
            if p.get("type") == "row":
                continue
            for holder in [p] + list(p.get("targets") or []):
                ds = holder.get("datasource")
                if ds is not None and (not isinstance(ds, dict) or ds.get("uid") != "${datasource}"):
                    errors.append(f"{path}: panel '{p.get('title')}' uses datasource {ds!r}, not ${{datasource}}")
            if not p.get("targets"):
                errors.append(f"{path}: panel '{p.get('title')}' has no query")
        for i, (p, t) in enumerate(targets_of(dash)):
            n_exprs += 1
            group["rules"].append({"record": f"dashboard:check:{i}", "expr": substitute(t["expr"]),
                                   "labels": {"panel": p.get("title", "")[:60]}})
        for i, ann in enumerate(annotations_of(dash)):
            ds = ann.get("datasource")
            if not isinstance(ds, dict) or ds.get("uid") != "${datasource}":
                errors.append(f"{path}: annotation '{ann.get('name')}' uses datasource {ds!r}, not ${{datasource}}")
            if not ann.get("expr"):
                errors.append(f"{path}: annotation '{ann.get('name')}' has no expr")
                continue
            n_annotations += 1
            group["rules"].append({"record": f"dashboard:annotation:{i}", "expr": substitute(ann["expr"]),
                                   "labels": {"annotation": ann.get("name", "")[:60]}})
        rules["groups"].append(group)
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as fh:
        json.dump(rules, fh)  # JSON is YAML
        rules_path = fh.name
    res = subprocess.run(["promtool", "check", "rules", rules_path], capture_output=True, text=True)
    if res.returncode != 0:
        errors.append("promtool check rules on the panel exprs failed:\n" + res.stdout + res.stderr)
    Path(rules_path).unlink(missing_ok=True)
    for e in errors:
        print(f"FAIL {e}")
    print(f"dashboards: {len(paths)} file(s), {n_exprs} panel queries, {n_annotations} annotation queries; "
          f"{'OK' if not errors else str(len(errors)) + ' problem(s)'}")
    return 1 if errors else 0


def query(paths: list[Path], url: str, rng: str, allow_empty: list[str]) -> int:
    empty, ok, failed = [], 0, 0
    for path in paths:
        dash = json.loads(path.read_text())
        queries = list(targets_of(dash)) + [
            ({"title": f"annotation {a.get('name')}"}, {"expr": a["expr"], "refId": "-"})
            for a in annotations_of(dash) if a.get("expr")]
        for p, t in queries:
            expr = substitute(t["expr"], rng)
            q = urllib.parse.urlencode({"query": expr})
            title = f"{p.get('title')} [{t.get('refId')}]"
            try:
                with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
                    body = json.load(resp)
            except Exception as e:  # noqa: BLE001
                print(f"  ERROR   {title}: {e}")
                failed += 1
                continue
            result = body.get("data", {}).get("result", [])
            if body.get("status") != "success":
                print(f"  ERROR   {title}: {body}")
                failed += 1
            elif result:
                sample = ", ".join(
                    f"{','.join(f'{k}={v}' for k, v in r['metric'].items() if k not in ('job', 'deployment')) or '-'}"
                    f"={float(r['value'][1]):.4g}" for r in result[:3])
                print(f"  DATA    {title}: {len(result)} series ({sample}{', ...' if len(result) > 3 else ''})")
                ok += 1
            elif any(s in title for s in allow_empty) or title.startswith("annotation "):
                # Annotations mark events (rebuilds, deploys, restarts): a run
                # without one has nothing to show.
                print(f"  empty   {title} (allowed)")
                ok += 1
            else:
                print(f"  EMPTY   {title}\n          {expr}")
                empty.append(title)
    print(f"dashboard queries: {ok} passed, {len(empty) + failed} failed")
    return 1 if empty or failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("lint")
    lp.add_argument("files", nargs="*")
    qp = sub.add_parser("query")
    qp.add_argument("--url", default="http://127.0.0.1:19090")
    qp.add_argument("--range", default="15m")
    qp.add_argument("--allow-empty", action="append", default=[])
    qp.add_argument("files", nargs="*")
    a = ap.parse_args()
    if a.cmd == "lint":
        return lint(files(a.files))
    return query(files(a.files), a.url.rstrip("/"), a.range, a.allow_empty)


if __name__ == "__main__":
    sys.exit(main())
