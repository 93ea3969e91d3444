//! How long one best-group-or-create takes as the number of groups grows,
//! for the designs a user would pick:
//!
//! - `linear`: the rule read literally, intersecting every group (in Rust);
//! - `memory`: cohort's in-process t-subset index;
//! - `redis`: cohort's Lua script, one round trip on loopback;
//! - `naive-lua`: a Lua script that SINTERCARDs every group's Redis set;
//! - `postgres`: the exact decision from Postgres's subset table alone, what
//!   signups use while Redis is missing, partial or being rebuilt.
//!
//! Each signup is a joiner: three or four attributes of an existing group
//! plus fresh ones from the generator, the steady state of a mature
//! population; nothing is written, so the population stays the size named.
//! `ping/redis` is a plain round trip measured in the same run. Founding
//! (the subset table's inserts at 6 and 16 attributes), the whole signup
//! path less argon2, Redis memory per group and reindex throughput are
//! printed as lines of their own.
//!
//! Run: `cargo bench --bench assign -- --output-format bencher`
//! (`COHORT_BENCH_MAX_GROUPS=100000` for a shorter run). Needs the local
//! Postgres (a scratch database is created and dropped) and redis-server
//! (a private one is started on a free port).

#[path = "support/memory_hashbrown.rs"]
mod memory_hashbrown;
#[path = "support/population.rs"]
mod population;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cohort::domain::grouping::{LinearScan, subset_keys};
use cohort::domain::{AttributeRules, AttributeSet, GroupId, Threshold, Username};
use cohort::index::memory::MemoryIndex;
use cohort::index::redis::RedisIndex;
use cohort::index::redis::conn::RedisConn;
use cohort::index::{IndexError, IndexMarks, IndexSource, SyncLock};
use cohort::store::postgres::PgStore;
use cohort::store::{NewUser, Plan, Store};
use criterion::{BenchmarkId, Criterion};
use population::Population;
use rand::{RngExt, SeedableRng};
use std::hint::black_box;

// The same allocator as the binary (see src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RULES: AttributeRules = AttributeRules { min: 3, max: 16 };

fn threshold() -> Threshold {
    Threshold::new(3, 16).unwrap()
}

/// Founds groups from the generator until there are `n`.
fn build_groups(n: usize) -> Vec<(GroupId, AttributeSet)> {
    let index = MemoryIndex::new(threshold());
    let mut pop = Population::new(42);
    let mut groups = Vec::with_capacity(n);
    let mut signups = 0u64;
    while groups.len() < n {
        signups += 1;
        let Ok(user) = AttributeSet::parse(&pop.user(), RULES) else {
            continue;
        };
        if index.best_now(&user).is_none() {
            let id = GroupId(groups.len() as i64 + 1);
            index.add_now(id, user.clone());
            groups.push((id, user));
            if groups.len().is_power_of_two() || groups.len() % 100_000 == 0 {
                eprintln!(
                    "population: {} groups after {signups} signups",
                    groups.len()
                );
            }
        }
    }
    eprintln!("population: {n} groups founded by {signups} signups");
    groups
}

/// How much of this process's memory the kernel backs with 2 MiB pages
/// (transparent huge pages): the in-process index's figures depend on it.
fn huge_pages() -> String {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "resident {}, of which in huge pages {}",
        field("Rss:"),
        field("AnonHugePages:")
    )
}

/// How many distinct joiners each size cycles through
/// (`COHORT_BENCH_QUERIES`, default 1,000). Few stay in the CPU's caches
/// after the first round; 100,000 touch the index as a live stream of
/// signups does, nearly every lookup a miss.
fn queries_per_size() -> usize {
    std::env::var("COHORT_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// Joiners for a population of the first `n` groups.
fn joiners(groups: &[(GroupId, AttributeSet)], count: usize) -> Vec<AttributeSet> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut pop = Population::new(99);
    (0..count)
        .map(|_| {
            let g = &groups[rng.random_range(0..groups.len())].1;
            let keep = rng.random_range(3..=4.min(g.len()));
            let mut raw: Vec<String> = g.iter().take(keep).map(|a| a.to_string()).collect();
            raw.extend(pop.user().into_iter().take(3));
            AttributeSet::parse(&raw, RULES).unwrap()
        })
        .collect()
}

/// Brand-new users that match no group (for the founding figures).
fn founders(count: usize, tag: usize) -> Vec<AttributeSet> {
    (0..count)
        .map(|i| {
            let raw: Vec<String> = (0..6).map(|j| format!("fresh-{tag}-{i}-{j}")).collect();
            AttributeSet::parse(&raw, RULES).unwrap()
        })
        .collect()
}

/// The population as an index source, for loading Redis without Postgres.
struct InMemorySource(Arc<Vec<(GroupId, AttributeSet)>>, usize);

#[async_trait]
impl IndexSource for InMemorySource {
    async fn group_count(&self) -> Result<u64, IndexError> {
        Ok(self.1 as u64)
    }
    async fn groups_after(
        &self,
        after: Option<GroupId>,
        limit: usize,
    ) -> Result<Vec<(GroupId, AttributeSet)>, IndexError> {
        let start = after.map_or(0, |g| g.0 as usize);
        Ok(self.0[start.min(self.1)..(start + limit).min(self.1)].to_vec())
    }
    async fn unindexed_groups(&self, _: usize) -> Result<Vec<(GroupId, AttributeSet)>, IndexError> {
        Ok(Vec::new())
    }
    async fn mark_indexed(&self, _: &[GroupId]) -> Result<(), IndexError> {
        Ok(())
    }
    async fn mark_indexed_unless_locked(&self, _: &[GroupId]) -> Result<bool, IndexError> {
        Ok(true)
    }
    async fn marks(&self) -> Result<IndexMarks, IndexError> {
        Ok(IndexMarks::default())
    }
    async fn mark_dirty(&self) -> Result<(), IndexError> {
        Ok(())
    }
    async fn mark_synced(&self, _: i64, _: &str) -> Result<(), IndexError> {
        Ok(())
    }
    async fn lock_sync(&self) -> Result<Option<SyncLock>, IndexError> {
        Ok(Some(SyncLock(Box::new(()))))
    }
}

struct PrivateRedis(Child, u16);

impl PrivateRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--maxmemory-policy", "noeviction"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child, port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const NAIVE_LUA: &str = r#"
-- The design card read literally: intersect the user with every group.
-- KEYS[1] the set of group ids, KEYS[2] a scratch set for the user;
-- ARGV[1] t, ARGV[2..] the user's attributes.
redis.call('DEL', KEYS[2])
redis.call('SADD', KEYS[2], unpack(ARGV, 2))
local best, best_m = nil, -1
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local m = redis.call('SINTERCARD', 2, KEYS[2], 'naive:g:' .. id)
  local n = tonumber(id)
  if m >= tonumber(ARGV[1]) and (m > best_m or (m == best_m and n < best)) then
    best, best_m = n, m
  end
end
return best
"#;

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let max: usize = std::env::var("COHORT_BENCH_MAX_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let sizes: Vec<usize> = [1_000, 10_000, 100_000, 1_000_000]
        .into_iter()
        .filter(|&n| n <= max)
        .collect();
    let started = Instant::now();
    let all = Arc::new(build_groups(*sizes.last().unwrap()));
    eprintln!(
        "population built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    if std::env::var_os("COHORT_BENCH_POPULATION_ONLY").is_some() {
        return;
    }
    // A current-thread runtime: block_on drives the connection itself, so a
    // round trip is not inflated by waking another thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let only: Option<Vec<String>> = std::env::var("COHORT_BENCH_IMPLS")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));

    // Postgres: a scratch database with cohort's own schema.
    let admin = std::env::var("COHORT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let dbname = format!("cohort_bench_{}", std::process::id());
    let (pg_admin, pg) = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {dbname}"))
            .await
            .unwrap();
        let url = admin.rsplit_once('/').unwrap().0.to_string() + "/" + &dbname;
        let (pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let store = PgStore::connect(&url, 4, threshold()).unwrap();
        store.migrate().await.unwrap();
        store.ensure_deployment(threshold()).await.unwrap();
        ((client, store), pg)
    });

    let redis_srv = PrivateRedis::start();
    let redis_url = format!("redis://127.0.0.1:{}", redis_srv.1);
    let mut conn = rt
        .block_on(
            redis::Client::open(redis_url.as_str())
                .unwrap()
                .get_multiplexed_async_connection(),
        )
        .unwrap();
    let redis_conn = Arc::new(RedisConn::new(&redis_url, Duration::from_secs(30)).unwrap());
    let naive = redis::Script::new(NAIVE_LUA);

    let mut loaded = 0;
    for &n in &sizes {
        let groups = &all[..n];
        let queries = joiners(groups, queries_per_size());
        let mut group = c.benchmark_group("assign");
        let mut i = 0;

        if want("memory") {
            // (b) the in-process index, first: its table wants 2 MiB pages, which
            // the kernel finds more easily before (a) has churned through
            // millions of small allocations.
            let memory = MemoryIndex::new(threshold());
            for (id, a) in groups {
                memory.insert(*id, a.clone());
            }
            eprintln!("memory/{n}: {}", huge_pages());
            group.bench_function(BenchmarkId::new("memory", n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    black_box(memory.best_now(&queries[i]))
                })
            });
        }

        if want("memory-hashbrown") {
            // (b') the same index before its one-word-slot layout, in the
            // same run (`support/memory_hashbrown.rs`).
            let memory = memory_hashbrown::HashbrownIndex::new(threshold());
            for (id, a) in groups {
                memory.insert(*id, a.clone());
            }
            eprintln!("memory-hashbrown/{n}: {}", huge_pages());
            group.bench_function(BenchmarkId::new("memory-hashbrown", n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    black_box(memory.best_now(&queries[i]))
                })
            });
        }

        if want("linear") {
            // (a) the linear scan.
            let mut linear = LinearScan::new(threshold());
            for (id, a) in groups {
                linear.insert(*id, a.clone());
            }
            group.bench_function(BenchmarkId::new("linear", n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    black_box(linear.best(&queries[i]))
                })
            });
            drop(linear);
        }

        if want("redis") {
            // (c) the Redis script: loaded by a sync, which is also the
            // reindex throughput and the memory figure.
            let index = RedisIndex::new(redis_conn.clone(), "bench:", threshold());
            let (report, per_group) = rt.block_on(async {
                let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
                let before = used_memory(&mut conn).await;
                let src = InMemorySource(all.clone(), n);
                let report = index.sync(&src, 65_536, &|_, _| {}).await.unwrap();
                let after = used_memory(&mut conn).await;
                (report, (after - before) as f64 / n as f64)
            });
            println!(
                "reindex/redis-from-memory/{n}: {:.0} groups/s ({} buckets); redis memory {:.0} bytes/group",
                n as f64 / report.elapsed.as_secs_f64(),
                report.buckets,
                per_group
            );
            group.bench_function(BenchmarkId::new("redis", n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    black_box(rt.block_on(index.decide(&queries[i])).unwrap().best)
                })
            });
            group.bench_function(BenchmarkId::new("ping", n), |b| {
                b.iter(|| {
                    let _: String = rt
                        .block_on(redis::cmd("PING").query_async(&mut conn))
                        .unwrap();
                })
            });

            // The add after a founding's commit, timed by hand: each grows
            // the population by one group.
            let fresh = founders(500, n);
            let started = Instant::now();
            let mut next = 10_000_000_000i64;
            for f in &fresh {
                next += 1;
                rt.block_on(index.add_groups(&[(GroupId(next), f.clone())]))
                    .unwrap();
            }
            println!(
                "found/redis-add/{n}: {:.1} us per added group (500 groups)",
                started.elapsed().as_secs_f64() * 1e6 / fresh.len() as f64
            );
        }

        // (d) the naive script, up to 1e5 groups.
        if n <= 100_000 && want("naive-lua") {
            rt.block_on(async {
                for chunk in groups.chunks(5_000) {
                    let mut p = redis::pipe();
                    for (id, a) in chunk {
                        p.cmd("SADD")
                            .arg(format!("naive:g:{}", id.0))
                            .arg(a.to_strings())
                            .ignore();
                        p.cmd("SADD").arg("naive:ids").arg(id.0).ignore();
                    }
                    let _: () = p.query_async(&mut conn).await.unwrap();
                }
            });
            group.bench_function(BenchmarkId::new("naive-lua", n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    let mut inv = naive.prepare_invoke();
                    inv.key("naive:ids").key("naive:user").arg(3);
                    for a in queries[i].iter() {
                        inv.arg(a.as_str());
                    }
                    let r: Option<i64> = rt.block_on(inv.invoke_async(&mut conn)).unwrap();
                    black_box(r)
                })
            });
        }

        if want("postgres") {
            // (e) Postgres alone: the exact decision from the subset table.
            // Groups and their subsets are loaded with COPY, not through the
            // API.
            let store = &pg_admin.1;
            rt.block_on(async {
                use futures_util::SinkExt;
                let mut gbuf = String::new();
                let mut sbuf = String::new();
                for (id, a) in &all[loaded..n] {
                    gbuf.push_str(&format!("{}\t{{{}}}\tt\n", id.0, a.to_strings().join(",")));
                    for k in subset_keys(a, threshold()) {
                        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
                        sbuf.push_str(&format!("{hex}\t{}\n", id.0));
                    }
                }
                for (sql, buf) in [
                    ("COPY groups (id, attributes, indexed) FROM STDIN", gbuf),
                    ("COPY subset_owners (subset, group_id) FROM STDIN", sbuf),
                ] {
                    let sink = pg.copy_in(sql).await.unwrap();
                    let mut sink = Box::pin(sink);
                    // In pieces: one protocol message is at most 1 GB.
                    let buf = bytes::Bytes::from(buf);
                    let mut at = 0;
                    while at < buf.len() {
                        let mut end = (at + (8 << 20)).min(buf.len());
                        while end < buf.len() && buf[end - 1] != b'\n' {
                            end += 1;
                        }
                        sink.send(buf.slice(at..end)).await.unwrap();
                        at = end;
                    }
                    sink.as_mut().finish().await.unwrap();
                }
                // Groups the founding figures below create take ids far
                // above the population's, which the next size loads.
                pg.batch_execute(&format!(
                    "ANALYZE groups; ANALYZE subset_owners; SELECT setval('group_ids', {})",
                    1_000_000_000i64 * (n as i64).ilog10() as i64
                ))
                .await
                .unwrap();
            });
            loaded = n;
            group.bench_function(BenchmarkId::new("postgres", n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    black_box(rt.block_on(store.best_group(&queries[i])).unwrap())
                })
            });

            // Founding: the group, its C(k, 3) subsets and the founder in
            // one transaction, at 6 and at 16 attributes.
            for k in [6usize, 16] {
                let fresh: Vec<AttributeSet> = (0..200)
                    .map(|j| {
                        let raw: Vec<String> =
                            (0..k).map(|x| format!("found-{n}-{k}-{j}-{x}")).collect();
                        AttributeSet::parse(&raw, RULES).unwrap()
                    })
                    .collect();
                let started = Instant::now();
                for (j, f) in fresh.iter().enumerate() {
                    rt.block_on(store.commit_signup(&NewUser {
                        username: Username::parse(&format!("f{n}k{k}n{j}")).unwrap(),
                        password_hash: "x".into(),
                        attributes: f.clone(),
                        plan: Plan::Found,
                        decided_in_index: None,
                        idempotency: None,
                    }))
                    .unwrap();
                }
                println!(
                    "found/postgres-commit/{n}/k={k}: {:.0} us per founding (200, serial)",
                    started.elapsed().as_secs_f64() * 1e6 / fresh.len() as f64
                );
            }

            // The whole signup path less argon2, one replica, serial: decide
            // in Redis, commit, add when founding.
            if want("redis") {
                // As the keeper leaves it: the index synced, not dirty, and
                // the groups the founding figures above committed confirmed
                // long ago. Left unconfirmed, every join's commit-time check
                // (V8) would read those hundreds of groups, which the keeper
                // confirms within a second in a running deployment.
                rt.block_on(async {
                    let marks = store.marks().await.unwrap();
                    store.mark_synced(marks.dirty, "bench").await.unwrap();
                    pg.batch_execute(
                        "UPDATE groups SET indexed = true, indexed_at = now() - interval '1 hour' \
                         WHERE NOT indexed",
                    )
                    .await
                    .unwrap();
                });
                let index = RedisIndex::new(redis_conn.clone(), "bench:", threshold());
                let started = Instant::now();
                let count = 500;
                for (j, q) in queries
                    .iter()
                    .take(count / 2)
                    .chain(founders(count / 2, n + 7).iter())
                    .enumerate()
                {
                    rt.block_on(async {
                        let best = index.decide(q).await.unwrap().best;
                        let c = store
                            .commit_signup(&NewUser {
                                username: Username::parse(&format!("p{n}n{j}")).unwrap(),
                                password_hash: "x".into(),
                                attributes: q.clone(),
                                plan: best.map_or(Plan::Found, Plan::Join),
                                decided_in_index: Some(std::time::Instant::now()),
                                idempotency: None,
                            })
                            .await
                            .unwrap();
                        if c.founded {
                            index
                                .add_groups(&[(c.user.group_id, c.group_attributes.clone())])
                                .await
                                .unwrap();
                        }
                    });
                }
                println!(
                    "signup-path/{n}: {:.0} us per signup less argon2 (250 joins + 250 foundings, serial)",
                    started.elapsed().as_secs_f64() * 1e6 / count as f64
                );
            }
        }

        group.finish();
    }

    rt.block_on(async {
        let _ = pg_admin
            .0
            .batch_execute(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
            .await;
    });
    c.final_summary();
}
