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
  * the recommended labels app.kubernetes.io/{name,instance,version,component,
    part-of,managed-by} on every object, name/instance/component on every pod
    template, and cohort's `version` equal to the cohort image's tag
  * NetworkPolicy: the API pods admit traffic only per port and only from
    selected namespaces (the ingress controller's for `http`, Prometheus' for
    `metrics`); every cohort pod is under an Egress policy that allows only
    DNS (53 UDP+TCP), Postgres (5432) and Redis (6379, 6380)
  * the `cohort verify` CronJob: present, concurrencyPolicy Forbid, history
    limits, a deadline, and the Deployment's image, envFrom, service account
    and securityContext (pod and container)

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
RECOMMENDED = ["name", "instance", "version", "component", "part-of", "managed-by"]
POD_TEMPLATE_LABELS = ["name", "instance", "component"]
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
EGRESS_ALLOWED = {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (6379, "TCP"), (6380, "TCP")}
EGRESS_REQUIRED = {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (6379, "TCP")}


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


def image_tag(image: str) -> str | None:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


def resolve_port(port, container_ports: dict[str, int]):
    """A NetworkPolicy port (name or number) as a number, when it can be known."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    return container_ports.get(port, port)


def check_labels(name: str, docs: list[dict], r: Report) -> None:
    cohort_tag = None
    for d in docs:
        if d["kind"] == "Deployment":
            for c in pod_spec(d).get("containers") or []:
                if is_cohort(c):
                    cohort_tag = image_tag(c.get("image", ""))
    for d in docs:
        obj = f"{name}: {d['kind']}/{d['metadata']['name']}"
        labels = d["metadata"].get("labels") or {}
        missing = [k for k in RECOMMENDED if not labels.get(f"app.kubernetes.io/{k}")]
        r.check(not missing, f"{obj}: recommended labels" + (f" (missing {', '.join(missing)})" if missing else ""))
        bad = [k for k, v in labels.items() if not LABEL_VALUE.match(str(v)) or len(str(v)) > 63]
        r.check(not bad, f"{obj}: label values are valid" + (f" ({', '.join(bad)})" if bad else ""))
        if d["kind"] in WORKLOADS:
            pl = pod_labels(d)
            pm = [k for k in POD_TEMPLATE_LABELS if not pl.get(f"app.kubernetes.io/{k}")]
            r.check(not pm, f"{obj}: pod template labels name, instance, component"
                    + (f" (missing {', '.join(pm)})" if pm else ""))
        if labels.get("app.kubernetes.io/name") == "cohort" and cohort_tag:
            v = labels.get("app.kubernetes.io/version")
            r.check(v == cohort_tag, f"{obj}: app.kubernetes.io/version {v} is the cohort image tag {cohort_tag}")


def check_network_policies(name: str, docs: list[dict], r: Report) -> None:
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for d in docs:
        if d["kind"] not in WORKLOADS or pod_labels(d).get("app.kubernetes.io/name") != "cohort":
            continue
        wl = f"{name}: {d['kind']}/{d['metadata']['name']}"
        labels = pod_labels(d)
        pod = pod_spec(d)
        cports = {p.get("name"): p.get("containerPort") for c in pod.get("containers") or []
                  for p in c.get("ports") or [] if p.get("name")}
        selecting = [p for p in pols if selector_matches(p["spec"].get("podSelector"), labels)
                     or p["spec"].get("podSelector") == {}]
        # -- ingress
        ing_pols = [p for p in selecting if "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])]
        r.check(bool(ing_pols), f"{wl}: selected by an Ingress NetworkPolicy (default deny)")
        admitted: dict = {}
        open_rule = False
        for p in ing_pols:
            for rule in p["spec"].get("ingress") or []:
                peers = rule.get("from") or []
                ports = rule.get("ports") or []
                if not peers or not ports:
                    open_rule = True
                for peer in peers:
                    ns = peer.get("namespaceSelector")
                    if not ns or not (ns.get("matchLabels") or ns.get("matchExpressions")) or "ipBlock" in peer:
                        open_rule = True
                for port in ports:
                    admitted.setdefault(resolve_port(port.get("port"), cports), []).append(peers)
        r.check(not open_rule, f"{wl}: every ingress rule names its ports and its source namespaces")
        if d["kind"] == "Deployment" and "http" in cports:
            for pname in ("http", "metrics"):
                if pname in cports:
                    r.check(bool(admitted.get(cports[pname])),
                            f"{wl}: the {pname} port is admitted from a selected namespace")
            h = admitted.get(cports.get("http")) or []
            m = admitted.get(cports.get("metrics")) or []
            r.check(not h or not m or h != m, f"{wl}: http and metrics admitted from different sources")
        extra = set(admitted) - set(cports.values())
        r.check(not extra, f"{wl}: ingress admits only its declared ports" + (f" (also {extra})" if extra else ""))
        # -- egress
        eg_pols = [p for p in selecting if "Egress" in (p["spec"].get("policyTypes") or [])]
        r.check(bool(eg_pols), f"{wl}: selected by an Egress NetworkPolicy")
        allowed, unrestricted = set(), False
        for p in eg_pols:
            for rule in p["spec"].get("egress") or []:
                if not rule.get("ports"):
                    unrestricted = True
                for port in rule.get("ports") or []:
                    allowed.add((resolve_port(port.get("port"), cports), port.get("protocol", "TCP")))
        r.check(not unrestricted, f"{wl}: every egress rule is limited to ports")
        r.check(allowed <= EGRESS_ALLOWED, f"{wl}: egress only to DNS, Postgres, Redis"
                + (f" (also {sorted(allowed - EGRESS_ALLOWED, key=str)})" if not allowed <= EGRESS_ALLOWED else ""))
        r.check(EGRESS_REQUIRED <= allowed, f"{wl}: egress to DNS (53 UDP+TCP), Postgres 5432 and Redis 6379"
                + (f" (missing {sorted(EGRESS_REQUIRED - allowed, key=str)})" if not EGRESS_REQUIRED <= allowed else ""))


def check_verify_cronjob(name: str, docs: list[dict], r: Report) -> None:
    dep = next((d for d in docs if d["kind"] == "Deployment" and any(
        is_cohort(c) for c in pod_spec(d).get("containers") or [])), None)
    cjs = [d for d in docs if d["kind"] == "CronJob" and any(
        is_cohort(c) and "verify" in (c.get("args") or []) for c in pod_spec(d).get("containers") or [])]
    r.check(len(cjs) == 1, f"{name}: one CronJob runs `cohort verify`")
    if not cjs or dep is None:
        return
    cj = cjs[0]
    cn = f"{name}: CronJob/{cj['metadata']['name']}"
    spec = cj["spec"]
    job = spec["jobTemplate"]["spec"]
    pod = pod_spec(cj)
    dpod = pod_spec(dep)
    c = next(x for x in pod["containers"] if is_cohort(x))
    dc = next(x for x in dpod["containers"] if is_cohort(x))
    r.check(spec.get("concurrencyPolicy") == "Forbid", f"{cn}: concurrencyPolicy Forbid")
    for k in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        v = spec.get(k)
        r.check(isinstance(v, int) and 0 < v <= 10, f"{cn}: {k} set (1-10: {v})")
    r.check(isinstance(job.get("activeDeadlineSeconds"), int), f"{cn}: the Job has an activeDeadlineSeconds")
    r.check(pod.get("restartPolicy") in ("Never", "OnFailure"), f"{cn}: restartPolicy Never or OnFailure")
    r.check(c.get("image") == dc.get("image"), f"{cn}: the Deployment's image ({c.get('image')})")
    r.check(c.get("envFrom") == dc.get("envFrom") and c.get("env") == dc.get("env"),
            f"{cn}: the Deployment's environment (envFrom and env)")
    r.check(pod.get("securityContext") == dpod.get("securityContext"), f"{cn}: the Deployment's pod securityContext")
    r.check(c.get("securityContext") == dc.get("securityContext"), f"{cn}: the Deployment's container securityContext")
    r.check(pod.get("serviceAccountName") == dpod.get("serviceAccountName")
            and pod.get("automountServiceAccountToken") is False,
            f"{cn}: the Deployment's service account, no token mounted")


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

    check_labels(name, docs, r)
    check_network_policies(name, docs, r)
    check_verify_cronjob(name, docs, r)


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

    def kind(docs, k):
        return next(d for d in docs if d["kind"] == k)

    def api_np(docs):
        return next(d for d in docs if d["kind"] == "NetworkPolicy"
                    and (d["spec"].get("podSelector") or {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "api")

    def egress_np(docs):
        return next(d for d in docs if d["kind"] == "NetworkPolicy" and "Egress" in (d["spec"].get("policyTypes") or []))

    def cj0(docs):
        return pod_spec(kind(docs, "CronJob"))["containers"][0]

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
        ("a recommended label missing", lambda d: kind(d, "Service")["metadata"]["labels"]
            .pop("app.kubernetes.io/instance")),
        ("version label is not the image tag", lambda d: dep(d)["metadata"]["labels"]
            .update({"app.kubernetes.io/version": "9.9.9"})),
        ("pod template without component", lambda d: dep(d)["spec"]["template"]["metadata"]["labels"]
            .pop("app.kubernetes.io/component")),
        ("API port open to every namespace", lambda d: api_np(d)["spec"]["ingress"][0].pop("from")),
        ("API port open to any pod in the cluster", lambda d: api_np(d)["spec"]["ingress"][0]
            .update({"from": [{"namespaceSelector": {}}]})),
        ("metrics port not admitted", lambda d: api_np(d)["spec"]["ingress"].pop(1)),
        ("no egress policy", lambda d: d.remove(egress_np(d))),
        ("egress to any port", lambda d: egress_np(d)["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})),
        ("egress to port 443", lambda d: egress_np(d)["spec"]["egress"].append({"ports": [{"port": 443, "protocol": "TCP"}]})),
        ("no DNS egress", lambda d: egress_np(d)["spec"]["egress"].pop(0)),
        ("no verify CronJob", lambda d: d.remove(kind(d, "CronJob"))),
        ("verify CronJob concurrencyPolicy Allow", lambda d: kind(d, "CronJob")["spec"].update(concurrencyPolicy="Allow")),
        ("verify CronJob without a history limit", lambda d: kind(d, "CronJob")["spec"].pop("failedJobsHistoryLimit")),
        ("verify CronJob on another image", lambda d: cj0(d).update(image="ghcr.io/example/cohort:0.0.9")),
        ("verify CronJob without the secrets", lambda d: cj0(d)["envFrom"].pop()),
        ("verify CronJob securityContext differs", lambda d: pod_spec(kind(d, "CronJob"))["securityContext"]
            .update(runAsUser=1000)),
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
