#!/usr/bin/env python3
"""Reads at the speed of Postgres: cohort against pgbench, side by side.

Builds a population straight into a fresh database with COPY (not through
the API): USERS users in GROUPS groups with Zipf-like sizes, the largest
LARGEST members. Starts one cohort replica (the release binary) on it, then,
for PAIRS rounds, runs wrk against cohort and pgbench with the same SQL on
the same database, one right after the other, so both see the same machine:

  small page   GET /v1/me/group (5-20 members)   vs  the keyset page query alone
  big page     GET /v1/me/group (LARGEST members) vs  (the same, big group)
  me           GET /v1/me                         vs  its one-row lookup
  signups      POST /v1/signup (wrk, unique names) vs the argon2 ceiling
               (cores / mean hash time, from cohort's own histogram, same run)

Prints medians and ranges as a markdown table and writes the raw figures
as JSON. Needs: wrk, pgbench, psql, redis on 127.0.0.1:6379, Postgres on
127.0.0.1:5432 (trust), target/release/cohort (or COHORT_BIN).

Usage: loadtest/read-bench [--users N] [--groups N] [--largest N]
       [--pairs N] [--duration S] [--connections N]
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "bench passphrase of the read benchmark"


def log(*a):
    print("[read-bench]", *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psql(db, sql, *extra):
    r = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres",
         "-d", db, "-At", "-c", sql, *extra],
        capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"read-bench: psql failed: {r.stderr.strip()}")
    return r.stdout.strip()


def http(method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def zipf_sizes(users, groups, largest):
    """Group sizes: the largest fixed, the rest ~ A / rank (at least 1),
    with A found by bisection so that the sizes sum to `users`."""
    rest = users - largest
    n = groups - 1
    lo, hi = 0.0, float(rest)
    for _ in range(100):
        a = (lo + hi) / 2
        total = sum(max(1, int(a / r)) for r in range(2, n + 2))
        if total > rest:
            hi = a
        else:
            lo = a
    sizes = [largest] + [max(1, int(lo / r)) for r in range(2, n + 2)]
    sizes[1] += users - sum(sizes)  # the rounding remainder
    return sizes


def populate(db, hash_, users, groups, largest, tmp):
    sizes = zipf_sizes(users, groups, largest)
    first_gid = int(psql(db, "SELECT coalesce(max(id), 0) + 1 FROM groups"))
    gfile = os.path.join(tmp, "groups.csv")
    ufile = os.path.join(tmp, "users.csv")
    with open(gfile, "w") as g:
        for i in range(groups):
            gid = first_gid + i
            attrs = ",".join(f"g{gid}{c}" for c in "abcde")
            g.write(f'{gid},"{{{attrs}}}",true\n')
    members = []
    for i, size in enumerate(sizes):
        members.extend([first_gid + i] * size)
    random.Random(7).shuffle(members)  # join order interleaved, as in real life
    with open(ufile, "w") as u:
        for n, gid in enumerate(members):
            attrs = ",".join(f"g{gid}{c}" for c in "abcde")
            u.write(f'bench{n},"{hash_}","{{{attrs}}}",{gid}\n')
    t = time.time()
    psql(db, f"\\copy groups (id, attributes, indexed) FROM '{gfile}' CSV")
    psql(db, f"\\copy users (username, password_hash, attributes, group_id) FROM '{ufile}' CSV")
    psql(db, f"SELECT setval('group_ids', {first_gid + groups})")
    psql(db, "ANALYZE")
    log(f"COPY of {users} users in {groups} groups took {time.time() - t:.1f}s")
    return first_gid, sizes


def wrk(url, token, duration, conns, script=None):
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{duration}s", "--latency"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99ms = None
    if p99:
        v, unit = float(p99.group(1)), p99.group(2)
        p99ms = v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = int(non2xx.group(1)) if non2xx else 0
    # Only answers that did what was asked count as throughput.
    ok_rps = rps * (total - bad) / total if total else 0.0
    return {"rps": rps, "ok_rps": ok_rps, "non2xx": bad, "p99_ms": p99ms}


def pgbench(db, sql, duration, conns, tmp, **vars_):
    f = os.path.join(tmp, "q.sql")
    with open(f, "w") as fh:
        fh.write(sql + "\n")
    cmd = ["pgbench", "-n", "-M", "prepared", "-c", str(conns), "-j", "2", "-T", str(duration),
           "-h", "127.0.0.1", "-U", "postgres", "-f", f]
    for k, v in vars_.items():
        cmd += ["-D", f"{k}={v}"]
    out = subprocess.run(cmd + [db], check=True, capture_output=True, text=True).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))


KEYSET = ("SELECT id, username, attributes FROM users "
          "WHERE group_id = :gid AND id > 0 ORDER BY id LIMIT 51;")
# The statement cohort sends for GET /v1/me/group (src/store/postgres.rs).
COHORT_PAGE = (
    "SELECT u.token_version, u.attributes, g.id, g.attributes, g.created_at, c.n, p.ids, "
    "p.names, p.attrs FROM users u JOIN groups g ON g.id = u.group_id "
    "CROSS JOIN LATERAL (SELECT coalesce(sum(n), 0)::bigint AS n FROM group_member_counts "
    "WHERE group_id = u.group_id) c CROSS JOIN LATERAL (SELECT array_agg(id ORDER BY id) AS ids, "
    "array_agg(username ORDER BY id) AS names, "
    "array_agg(array_to_string(attributes, chr(31)) ORDER BY id) AS attrs "
    "FROM (SELECT id, username, attributes FROM users WHERE group_id = u.group_id AND id > 0 "
    "ORDER BY id LIMIT 51) m) p WHERE u.id = :uid;")
ONE_ROW = ("SELECT username, attributes, group_id, created_at, token_version "
           "FROM users WHERE id = :uid;")

SIGNUP_LUA = r"""
local n = 0
local tag = tostring(os.time()) .. tostring(math.random(1000000))
setup = function(thread)
  -- wrk's Lua starts every run from the same random sequence: the clock
  -- keeps one run's names from colliding with the last one's (a 409 each).
  thread:set("tid", tostring(os.time() %% 100000) .. "t" .. tostring(math.random(100000)))
end
request = function()
  n = n + 1
  local name = "s" .. tid .. "x" .. n
  local body = '{"username":"' .. string.sub(name, 1, 32) .. '","password":"%s",' ..
    '"attributes":["w' .. (n %% 97) .. '","x' .. (n %% 89) .. '","y' .. (n %% 83) .. '","z' .. n .. '"]}'
  return wrk.format("POST", "/v1/signup", {["Content-Type"] = "application/json"}, body)
end
""" % PASSWORD


def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--groups", type=int, default=20_000)
    ap.add_argument("--largest", type=int, default=50_000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    for tool in ["wrk", "pgbench", "psql"]:
        if not shutil.which(tool):
            sys.exit(f"read-bench: {tool} is not installed (apt-get install wrk postgresql-client)")
    binary = os.environ.get("COHORT_BIN", os.path.join(REPO, "target/release/cohort"))
    if not os.access(binary, os.X_OK):
        sys.exit(f"read-bench: no binary at {binary} (cargo build --release)")

    ceiling_bin = os.path.join(os.path.dirname(binary), "examples", "argon2_ceiling")
    if not os.access(ceiling_bin, os.X_OK):
        sys.exit(f"read-bench: no {ceiling_bin} (cargo build --release --example argon2_ceiling)")
    db = f"cohort_bench_reads_{os.getpid()}"
    psql("postgres", f"CREATE DATABASE {db}")
    tmp = tempfile.mkdtemp(prefix="cohort-read-bench-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ,
               DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{db}?sslmode=disable",
               REDIS_URL="redis://127.0.0.1:6379",
               COHORT_REDIS_PREFIX=f"bench-reads-{os.getpid()}:",
               COHORT_JWT_SECRET="read benchmark secret, 32 bytes or more",
               COHORT_LISTEN=f"127.0.0.1:{port}",
               COHORT_LOG_FORMAT="json",
               COHORT_SIGNIN_MAX_FAILURES="1000",
               MIMALLOC_LARGE_OS_PAGES="1")
    logf = open(os.path.join(tmp, "cohort.log"), "w")
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=logf, stderr=logf)
    results = {"machine": {"cpus": os.cpu_count()}, "args": vars(args)}
    try:
        for _ in range(300):
            try:
                if http("GET", base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        status, body = http("POST", base + "/v1/signup", {
            "username": "benchseed", "password": PASSWORD,
            "attributes": ["seed1", "seed2", "seed3"]})
        assert status == 201, body
        hash_ = psql(db, "SELECT password_hash FROM users WHERE username = 'benchseed'")
        first_gid, sizes = populate(db, hash_, args.users, args.groups, args.largest, tmp)
        small_gid = next(first_gid + i for i, s in enumerate(sizes) if 5 <= s <= 20)
        small_uid = int(psql(db, f"SELECT min(id) FROM users WHERE group_id = {small_gid}"))
        big_uid = int(psql(db, f"SELECT min(id) FROM users WHERE group_id = {first_gid}"))
        small_name = psql(db, f"SELECT username FROM users WHERE id = {small_uid}")
        big_name = psql(db, f"SELECT username FROM users WHERE id = {big_uid}")
        tokens = {}
        for name in [small_name, big_name]:
            status, body = http("POST", base + "/v1/signin", {"username": name, "password": PASSWORD})
            assert status == 200, body
            tokens[name] = body["access_token"]
        # The index sync of the new groups, before measuring anything.
        for _ in range(600):
            if http("GET", base + "/readyz")[1].get("index") == "ready":
                break
            time.sleep(0.1)
        for name in [small_name, big_name]:
            status, body = http("GET", base + "/v1/me/group", token=tokens[name])
            assert status == 200, body
        log(f"small group {small_gid} ({sizes[small_gid - first_gid]} members), "
            f"big group {first_gid} ({sizes[0]} members)")

        d, c = args.duration, args.connections
        runs = {k: [] for k in ["small", "small_pg_keyset", "small_pg_cohort_sql", "big",
                                "big_pg_keyset", "me", "me_pg", "signups", "argon2_ceiling"]}
        lua = os.path.join(tmp, "signup.lua")
        with open(lua, "w") as fh:
            fh.write(SIGNUP_LUA)
        for p in range(args.pairs):
            log(f"pair {p + 1}/{args.pairs}")
            runs["small"].append(wrk(base + "/v1/me/group", tokens[small_name], d, c))
            runs["small_pg_keyset"].append(pgbench(db, KEYSET, d, c, tmp, gid=small_gid))
            runs["small_pg_cohort_sql"].append(pgbench(db, COHORT_PAGE, d, c, tmp, uid=small_uid))
            runs["big"].append(wrk(base + "/v1/me/group", tokens[big_name], d, c))
            runs["big_pg_keyset"].append(pgbench(db, KEYSET, d, c, tmp, gid=first_gid))
            runs["me"].append(wrk(base + "/v1/me", tokens[small_name], d, c))
            runs["me_pg"].append(pgbench(db, ONE_ROW, d, c, tmp, uid=small_uid))
            # The ceiling: every core hashing at the service's parameters
            # and nothing else (examples/argon2_ceiling), right before.
            out = subprocess.run([ceiling_bin, str(d / 2)], check=True, capture_output=True,
                                 text=True).stdout
            runs["argon2_ceiling"].append(json.loads(out)["per_second"])
            runs["signups"].append(wrk(base + "/v1/signup", None, d, c, script=lua))
        # The member count as one row per group (a hot row: every joiner
        # of a big group waits for the one before it to commit) against
        # 16 shards, as cohort keeps it: concurrent joiners of one group,
        # each transaction inserting a member and counting it.
        psql(db, "CREATE TABLE hot_single (group_id bigint PRIMARY KEY, n bigint NOT NULL); "
                 "CREATE TABLE hot_sharded (group_id bigint, shard smallint, n bigint NOT NULL, "
                 "PRIMARY KEY (group_id, shard)); CREATE TABLE hot_members (id bigserial, g bigint); "
                 "INSERT INTO hot_single VALUES (1, 0)")
        single = ("BEGIN;\nINSERT INTO hot_members (g) VALUES (1);\n"
                  "UPDATE hot_single SET n = n + 1 WHERE group_id = 1;\nCOMMIT;")
        sharded = ("BEGIN;\nINSERT INTO hot_members (g) VALUES (1) RETURNING id \\gset\n"
                   "INSERT INTO hot_sharded AS c VALUES (1, :id % 16, 1) "
                   "ON CONFLICT (group_id, shard) DO UPDATE SET n = c.n + 1;\nCOMMIT;")
        runs["counter_single"] = [pgbench(db, single, d, 16, tmp) for _ in range(args.pairs)]
        runs["counter_sharded"] = [pgbench(db, sharded, d, 16, tmp) for _ in range(args.pairs)]
        rps = lambda k: [r["rps"] for r in runs[k]]
        rows = []

        def row(label, a, b, note):
            ratios = [x / y for x, y in zip(a, b)]
            rows.append((label, statistics.median(a), min(a), max(a), statistics.median(b),
                         statistics.median(ratios), min(ratios), max(ratios), note))

        row("GET /v1/me/group, small group", rps("small"), runs["small_pg_keyset"],
            "vs pgbench: keyset page query alone (target >= 0.5x)")
        row("GET /v1/me/group, small group", rps("small"), runs["small_pg_cohort_sql"],
            "vs pgbench: cohort's one statement")
        row("GET /v1/me/group, big group", rps("big"), rps("small"),
            f"vs the small group (target >= 0.8x); {sizes[0]} members")
        row("GET /v1/me/group, big group", rps("big"), runs["big_pg_keyset"],
            "vs pgbench: keyset page query alone, big group")
        row("GET /v1/me", rps("me"), runs["me_pg"], "vs pgbench: its one-row lookup (target >= 0.5x)")
        row("POST /v1/signup (201s only)", [r["ok_rps"] for r in runs["signups"]],
            runs["argon2_ceiling"],
            "vs the argon2 ceiling: every core hashing, nothing else (target >= 0.9x)")
        row("joins of one group: 16 counter shards", runs["counter_sharded"],
            runs["counter_single"], "vs one counter row per group (pgbench, 16 clients, tps)")
        results["runs"] = runs
        results["rows"] = rows
        print(f"\n{args.users} users in {args.groups} groups, largest {args.largest}; "
              f"{args.pairs} pairs of {d}s, {c} connections; {os.cpu_count()} CPUs\n")
        print("| what | cohort req/s (median, range) | other (median) | ratio median (range) | against |")
        print("|---|---|---|---|---|")
        for (label, med, lo, hi, other, r, rlo, rhi, note) in rows:
            print(f"| {label} | {med:,.0f} ({lo:,.0f}-{hi:,.0f}) | {other:,.0f} | "
                  f"**{r:.2f}x** ({rlo:.2f}-{rhi:.2f}) | {note} |")
        errors = sum(r["non2xx"] for k in ["small", "big", "me"] for r in runs[k])
        print(f"\nnon-2xx answers during the read runs: {errors}; "
              f"during the signup runs: {sum(r['non2xx'] for r in runs['signups'])}")
        out_dir = os.environ.get("LOADTEST_OUT", os.path.join(REPO, "loadtest/results"))
        os.makedirs(out_dir, exist_ok=True)
        out = os.path.join(out_dir, f"read-bench-{int(time.time())}.json")
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
        log(f"raw figures: {out}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        psql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)
        if shutil.which("redis-cli"):
            subprocess.run(["sh", "-c", f"redis-cli --scan --pattern '{env['COHORT_REDIS_PREFIX']}*'"
                            " | xargs -r redis-cli unlink >/dev/null"], check=False)


if __name__ == "__main__":
    main()
