#!/usr/bin/env python3
"""Policy test for cohort's rendered Kubernetes manifests.

Usage:
  k8s/policy_test.py                      render k8s/base and every k8s/overlays/*
                                          with `kubectl kustomize`, check each
  k8s/policy_test.py NAME=FILE ...        check already-rendered files
  k8s/policy_test.py --self-test          also prove that each rule fails on a
                                          deliberately broken copy of the base

What it asserts (the checks kube-score / kube-linter would make, which are not
installable here):
  * every pod-bearing workload: runAsNonRoot with a numeric non-zero UID,
    allowPrivilegeEscalation false, capabilities drop ALL, read-only root fs,
    seccomp RuntimeDefault, not privileged; CPU and memory requests and limits
    on every container; no :latest (or untagged) image
  * long-running workloads: startup, readiness and liveness probes
  * replicated Deployments: RollingUpdate with maxUnavailable 0, topology
    spread whose selector matches the pods, a PDB whose selector matches the
    Deployment, and no spec.replicas when an HPA scales it
  * HPA: targets an existing Deployment (whose containers request CPU)
  * cohort containers: preStop delay + COHORT_SHUTDOWN_TIMEOUT <
    terminationGracePeriodSeconds; /metrics on its own port
    (COHORT_METRICS_LISTEN) that no Ingress routes
  * no Secret is rendered outside the dev overlay

Prints one line per check and a closing "N passed, N failed"; exit 1 on any
failure. Needs PyYAML.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
DEFAULT_SHUTDOWN_TIMEOUT = 20  # cohort's default, seconds
DEFAULT_GRACE = 30  # Kubernetes' default terminationGracePeriodSeconds


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.failures: list[str] = []

    def check(self, cond: bool, what: str) -> bool:
        if cond:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.failed += 1
            self.failures.append(what)
            print(f"  FAIL  {what}")
        return cond


# ---------------------------------------------------------------- helpers
def pod_spec(doc: dict) -> dict:
    kind = doc["kind"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"].get("metadata", {}).get("labels", {}) or {}
    return doc["spec"]["template"].get("metadata", {}).get("labels", {}) or {}


def all_containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def eff(container: dict, pod: dict, key: str):
    """Effective securityContext value: container overrides pod."""
    csc = container.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    if key in csc:
        return csc[key]
    return psc.get(key)


def selector_matches(selector: dict | None, labels: dict) -> bool:
    if not selector:
        return False
    ml = selector.get("matchLabels") or {}
    if not ml and not selector.get("matchExpressions"):
        return False
    if any(labels.get(k) != v for k, v in ml.items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False  # untagged means :latest
    tag = last.rsplit(":", 1)[1]
    return tag != "" and tag.lower() != "latest"


def container_env(container: dict, docs: list[dict]) -> dict:
    """Resolve env from envFrom ConfigMaps (not Secrets) and literal env."""
    env: dict[str, str] = {}
    cms = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    for src in container.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref and ref.get("name") in cms:
            prefix = src.get("prefix", "")
            for k, v in (cms[ref["name"]].get("data") or {}).items():
                env[prefix + k] = str(v)
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif (e.get("valueFrom") or {}).get("configMapKeyRef"):
            r = e["valueFrom"]["configMapKeyRef"]
            cm = cms.get(r["name"])
            if cm and r["key"] in (cm.get("data") or {}):
                env[e["name"]] = str(cm["data"][r["key"]])
    return env


def prestop_seconds(container: dict) -> int | None:
    pre = ((container.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in pre:
        return int(pre["sleep"].get("seconds", 0))
    cmd = (pre.get("exec") or {}).get("command") or []
    m = re.search(r"sleep\s+(\d+)", " ".join(map(str, cmd)))
    if m:
        return int(m.group(1))
    return None


def port_of(addr: str) -> int | None:
    m = re.search(r":(\d+)$", addr or "")
    return int(m.group(1)) if m else None


def is_cohort(container: dict) -> bool:
    image = container.get("image", "")
    return "cohort" in image.rsplit("/", 1)[-1].split(":")[0].split("@")[0]


# ---------------------------------------------------------------- the policy
def check_rendering(name: str, docs: list[dict], r: Report) -> None:
    print(f"[{name}]")
    docs = [d for d in docs if isinstance(d, dict) and d.get("kind")]
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    pdbs = by_kind.get("PodDisruptionBudget", [])
    hpa_targets = {
        h["spec"]["scaleTargetRef"]["name"]
        for h in hpas
        if h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
    }

    r.check(any(is_cohort(c) for d in deployments.values() for c in all_containers(pod_spec(d))),
            f"{name}: renders a cohort Deployment")

    # -- every pod-bearing workload
    for d in docs:
        if d["kind"] not in WORKLOADS:
            continue
        wl = f"{name}: {d['kind']}/{d['metadata']['name']}"
        pod = pod_spec(d)
        for c in all_containers(pod):
            cn = f"{wl} container {c['name']}"
            uid = eff(c, pod, "runAsUser")
            r.check(eff(c, pod, "runAsNonRoot") is True, f"{cn}: runAsNonRoot")
            r.check(isinstance(uid, int) and not isinstance(uid, bool) and uid > 0,
                    f"{cn}: numeric non-root runAsUser ({uid!r})")
            csc = c.get("securityContext") or {}
            r.check(csc.get("allowPrivilegeEscalation") is False, f"{cn}: allowPrivilegeEscalation false")
            r.check(csc.get("privileged") in (None, False), f"{cn}: not privileged")
            drops = [str(x).upper() for x in ((csc.get("capabilities") or {}).get("drop") or [])]
            adds = (csc.get("capabilities") or {}).get("add") or []
            r.check("ALL" in drops and not adds, f"{cn}: capabilities drop ALL, add none")
            r.check(csc.get("readOnlyRootFilesystem") is True, f"{cn}: readOnlyRootFilesystem")
            sp = eff(c, pod, "seccompProfile") or {}
            r.check(sp.get("type") in ("RuntimeDefault", "Localhost"), f"{cn}: seccompProfile RuntimeDefault")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for rname in ("cpu", "memory"):
                    r.check(rname in (res.get(kind) or {}), f"{cn}: resources.{kind}.{rname}")
            r.check(image_pinned(c.get("image", "")), f"{cn}: image pinned, not :latest ({c.get('image')})")
        if d["kind"] in LONG_RUNNING:
            for c in pod.get("containers") or []:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    r.check(bool(c.get(probe)), f"{wl} container {c['name']}: has {probe}")

    # -- Deployments: rollout, scale, disruption, spread, shutdown
    for dname, d in deployments.items():
        wl = f"{name}: Deployment/{dname}"
        spec = d["spec"]
        pod = pod_spec(d)
        labels = pod_labels(d)
        replicated = dname in hpa_targets or int(spec.get("replicas", 1)) > 1
        r.check(selector_matches(spec.get("selector"), labels), f"{wl}: selector matches its pod labels")
        if dname in hpa_targets:
            r.check("replicas" not in spec, f"{wl}: no spec.replicas (HPA owns the scale)")
        if not replicated:
            continue
        strat = spec.get("strategy") or {}
        ru = strat.get("rollingUpdate") or {}
        r.check(strat.get("type", "RollingUpdate") == "RollingUpdate"
                and str(ru.get("maxUnavailable", "25%")) in ("0", "0%"),
                f"{wl}: RollingUpdate with maxUnavailable 0")
        tsc = pod.get("topologySpreadConstraints") or []
        keys = {t.get("topologyKey") for t in tsc if selector_matches(t.get("labelSelector"), labels)}
        r.check("kubernetes.io/hostname" in keys and "topology.kubernetes.io/zone" in keys,
                f"{wl}: topology spread over zone and hostname, selector matching the pods")
        matching = [p for p in pdbs if p["spec"].get("selector") == spec.get("selector")
                    and selector_matches(p["spec"].get("selector"), labels)]
        r.check(bool(matching), f"{wl}: a PodDisruptionBudget with the Deployment's selector")
        for p in pdbs:
            if selector_matches(p["spec"].get("selector"), labels):
                r.check("maxUnavailable" in p["spec"] or "minAvailable" in p["spec"],
                        f"{name}: PDB/{p['metadata']['name']} sets maxUnavailable or minAvailable")
        grace = int(pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE))
        for c in pod.get("containers") or []:
            if not is_cohort(c):
                continue
            cn = f"{wl} container {c['name']}"
            env = container_env(c, docs)
            pre = prestop_seconds(c)
            r.check(pre is not None and pre > 0, f"{cn}: preStop delay ({pre}s)")
            shut_raw = env.get("COHORT_SHUTDOWN_TIMEOUT")
            r.check(shut_raw is not None, f"{cn}: COHORT_SHUTDOWN_TIMEOUT set explicitly ({shut_raw})")
            shut = int(shut_raw) if shut_raw and shut_raw.isdigit() else DEFAULT_SHUTDOWN_TIMEOUT
            r.check((pre or 0) + shut < grace,
                    f"{cn}: preStop {pre}s + shutdown {shut}s < terminationGracePeriodSeconds {grace}s")
            # metrics on their own port
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            mport = port_of(env.get("COHORT_METRICS_LISTEN", ""))
            hport = port_of(env.get("COHORT_LISTEN", ""))
            r.check(mport is not None and mport != hport,
                    f"{cn}: COHORT_METRICS_LISTEN on its own port ({mport} vs API {hport})")
            r.check(ports.get("metrics") == mport and ports.get("http") == hport,
                    f"{cn}: container ports http={hport} and metrics={mport} declared")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                hg = (c.get(probe) or {}).get("httpGet") or {}
                r.check(hg.get("port") in ("http", hport), f"{cn}: {probe} on the API port")

    # -- HPAs
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        hn = f"{name}: HPA/{h['metadata']['name']}"
        target = deployments.get(ref["name"]) if ref.get("kind") == "Deployment" else None
        r.check(target is not None, f"{hn}: scaleTargetRef {ref.get('kind')}/{ref['name']} exists")
        if target is not None:
            r.check(all("cpu" in ((c.get("resources") or {}).get("requests") or {})
                        for c in pod_spec(target).get("containers") or []),
                    f"{hn}: target's containers request CPU")
            r.check(int(h["spec"].get("minReplicas", 1)) >= 1, f"{hn}: minReplicas >= 1")

    # -- PDBs select something
    for p in pdbs:
        r.check(any(selector_matches(p["spec"].get("selector"), pod_labels(d))
                    and p["spec"].get("selector") == d["spec"].get("selector")
                    for d in deployments.values()),
                f"{name}: PDB/{p['metadata']['name']} selector equals a Deployment's selector")

    # -- Services and Ingress: metrics never routed publicly
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    metrics_ports: dict[str, set] = {}
    for sname, s in services.items():
        mp = set()
        for p in s["spec"].get("ports") or []:
            if p.get("name") == "metrics" or p.get("targetPort") == "metrics":
                mp.update({p.get("name"), p.get("port")})
        metrics_ports[sname] = mp
    for ing in by_kind.get("Ingress", []):
        iname = f"{name}: Ingress/{ing['metadata']['name']}"
        backends = []
        if ing["spec"].get("defaultBackend"):
            backends.append(("<default>", ing["spec"]["defaultBackend"]))
        for rule in ing["spec"].get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                backends.append((path.get("path", "/"), path["backend"]))
                r.check("metrics" not in path.get("path", ""), f"{iname}: path {path.get('path')} is not /metrics")
        for path, be in backends:
            svc = be.get("service") or {}
            port = svc.get("port") or {}
            bad = metrics_ports.get(svc.get("name"), set())
            r.check(port.get("name") not in bad and port.get("number") not in bad,
                    f"{iname}: {path} -> {svc.get('name')}:{port.get('name') or port.get('number')} is not the metrics port")
    for sname, s in services.items():
        if any(p.get("name") == "http" for p in s["spec"].get("ports") or []) and sname == "cohort":
            r.check(bool(metrics_ports.get(sname)), f"{name}: Service/{sname} has a separate metrics port")

    # -- no committed secret outside dev
    if not name.startswith("overlays/dev"):
        r.check(not by_kind.get("Secret"), f"{name}: renders no Secret (created out of band)")


# ---------------------------------------------------------------- driver
def render(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return list(yaml.safe_load_all(out))


def targets() -> list[tuple[str, Path]]:
    t = [("base", ROOT / "base")]
    for o in sorted((ROOT / "overlays").iterdir()):
        if (o / "kustomization.yaml").exists():
            t.append((f"overlays/{o.name}", o))
    return t


def mutations():
    """(description, function) pairs that each break one rule in the base."""
    def dep(docs):
        return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "cohort")

    def c0(docs):
        return pod_spec(dep(docs))["containers"][0]

    def cm(docs):
        return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cohort-config"))

    def set_(f):
        return f

    return [
        ("privilege escalation allowed", lambda d: c0(d)["securityContext"].update(allowPrivilegeEscalation=True)),
        ("runs as root", lambda d: (c0(d)["securityContext"].update(runAsUser=0),
                                    pod_spec(dep(d))["securityContext"].update(runAsUser=0))),
        ("capability added", lambda d: c0(d)["securityContext"]["capabilities"].update(add=["NET_ADMIN"])),
        ("writable root fs", lambda d: c0(d)["securityContext"].update(readOnlyRootFilesystem=False)),
        ("no memory limit", lambda d: c0(d)["resources"]["limits"].pop("memory")),
        ("no readiness probe", lambda d: c0(d).pop("readinessProbe")),
        ("image :latest", lambda d: c0(d).update(image="ghcr.io/example/cohort:latest")),
        ("spec.replicas under HPA", lambda d: dep(d)["spec"].update(replicas=3)),
        ("maxUnavailable 1", lambda d: dep(d)["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1)),
        ("no topology spread", lambda d: pod_spec(dep(d)).pop("topologySpreadConstraints")),
        ("PDB selector mismatch", lambda d: next(x for x in d if x["kind"] == "PodDisruptionBudget")
            ["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "other"})),
        ("HPA targets a missing Deployment", lambda d: next(x for x in d if x["kind"] == "HorizontalPodAutoscaler")
            ["spec"]["scaleTargetRef"].update(name="nope")),
        ("shutdown timeout too long", lambda d: cm(d)["data"].update(COHORT_SHUTDOWN_TIMEOUT="30")),
        ("no preStop", lambda d: c0(d).pop("lifecycle")),
        ("metrics on the API port", lambda d: cm(d)["data"].update(COHORT_METRICS_LISTEN="0.0.0.0:8080")),
        ("Ingress routes metrics", lambda d: next(x for x in d if x["kind"] == "Ingress")["spec"]["rules"][0]
            ["http"]["paths"][0]["backend"]["service"]["port"].update(name="metrics")),
        ("Secret committed", lambda d: d.append({"apiVersion": "v1", "kind": "Secret",
                                                 "metadata": {"name": "x"}, "stringData": {"a": "b"}})),
    ]


def self_test(base_docs: list[dict], r: Report) -> None:
    print("[self-test: each deliberately broken copy of the base must fail]")
    for desc, mutate in mutations():
        docs = copy.deepcopy(base_docs)
        mutate(docs)
        inner = Report()
        saved = sys.stdout
        sys.stdout = open(os.devnull, "w")
        try:
            check_rendering("base", docs, inner)
        finally:
            sys.stdout.close()
            sys.stdout = saved
        r.check(inner.failed > 0, f"self-test: policy rejects '{desc}' ({inner.failed} rule(s) fired)")


def main(argv: list[str]) -> int:
    r = Report()
    want_self_test = "--self-test" in argv
    args = [a for a in argv if a != "--self-test"]
    renderings: list[tuple[str, list[dict]]] = []
    if args:
        for a in args:
            nm, _, f = a.partition("=")
            with open(f or nm) as fh:
                renderings.append((nm if f else Path(nm).stem, list(yaml.safe_load_all(fh))))
    else:
        for nm, p in targets():
            renderings.append((nm, render(p)))
    for nm, docs in renderings:
        check_rendering(nm, docs, r)
    if want_self_test:
        base = next((d for nm, d in renderings if nm == "base"), None) or render(ROOT / "base")
        self_test(base, r)
    print(f"policy: {r.passed} passed, {r.failed} failed")
    if r.failed:
        print("failed checks:")
        for f in r.failures:
            print(f"  - {f}")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
