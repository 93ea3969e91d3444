//! How long one best-group-or-create takes as the number of groups grows,
//! for the designs a user would pick:
//!
//! - `linear`: the rule read literally, intersecting every group (in Rust);
//! - `memory`: cohort's in-process t-subset index;
//! - `redis`: cohort's Lua script, one round trip on loopback;
//! - `naive-lua`: a Lua script that SINTERCARDs every group's Redis set;
//! - `postgres`: a GIN overlap query (and an insert when founding) under an
//!   advisory lock, Postgres alone.
//!
//! Each signup is a joiner: three or four attributes of an existing group
//! plus fresh ones from the generator, the steady state of a mature
//! population; nothing is written, so the population stays the size named.
//! `ping/redis` is a plain round trip measured in the same run. Founding,
//! Redis memory per group and reindex throughput are printed as lines of
//! their own.
//!
//! Run: `cargo bench --bench assign -- --output-format bencher`
//! (`COHORT_BENCH_MAX_GROUPS=100000` for a shorter run). Needs the local
//! Postgres (a scratch database is created and dropped) and redis-server
//! (a private one is started on a free port).

#[path = "support/population.rs"]
mod population;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cohort::domain::grouping::LinearScan;
use cohort::domain::{AttributeRules, AttributeSet, GroupId, Threshold};
use cohort::index::memory::MemoryIndex;
use cohort::index::redis::{self as redis_index, RedisIndex};
use cohort::index::{Decision, Epoch, GroupIndex, IndexError, IndexSource, RebuildLock};
use cohort::store::postgres::PgStore;
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
        if let Decision::NoMatch = index.decide_now(&user, None).unwrap() {
            let id = GroupId(groups.len() as i64 + 1);
            index.decide_now(&user, Some(id)).unwrap();
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
struct InMemorySource(
    Arc<Vec<(GroupId, AttributeSet)>>,
    usize,
    std::sync::atomic::AtomicI64,
);

#[async_trait]
impl IndexSource for InMemorySource {
    async fn lock_rebuild(&self, _: Threshold) -> Result<Option<RebuildLock>, IndexError> {
        Ok(Some(RebuildLock(Box::new(()))))
    }
    async fn advance_epoch(&self, _: Threshold) -> Result<Epoch, IndexError> {
        Ok(Epoch(
            self.2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
        ))
    }
    async fn current_epoch(&self, _: Threshold) -> Result<Option<Epoch>, IndexError> {
        Ok(None)
    }
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

async fn used_memory(conn: &mut redis::aio::ConnectionManager) -> i64 {
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
        let store = PgStore::connect(&url, 4).unwrap();
        store.migrate().await.unwrap();
        pg.batch_execute("CREATE INDEX groups_attributes_gin ON groups USING gin (attributes)")
            .await
            .unwrap();
        ((client, store), pg)
    });

    let redis_srv = PrivateRedis::start();
    let redis_url = format!("redis://127.0.0.1:{}", redis_srv.1);
    let mut conn = rt.block_on(redis_index::connect(&redis_url)).unwrap();
    let naive = redis::Script::new(NAIVE_LUA);

    let mut loaded = 0;
    for &n in &sizes {
        let groups = &all[..n];
        let queries = joiners(groups, 1_000);
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
            group.bench_function(BenchmarkId::new("memory", n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    black_box(memory.decide_now(&queries[i], None).unwrap())
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
            // (c) the Redis script: load by a rebuild, which is also the reindex
            // throughput and the memory figure.
            let index = RedisIndex::new(conn.clone(), "bench:", threshold(), 65_536);
            let (report, per_group) = rt.block_on(async {
                let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
                let before = used_memory(&mut conn).await;
                // Epochs far from the ones Postgres hands out below.
                let src =
                    InMemorySource(all.clone(), n, std::sync::atomic::AtomicI64::new(1 << 40));
                let report = index.rebuild(&src, &|_, _| {}).await.unwrap().unwrap();
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
                    black_box(rt.block_on(index.decide(&queries[i], None)).unwrap())
                })
            });
            group.bench_function(BenchmarkId::new("ping", n), |b| {
                b.iter(|| {
                    let _: String = rt
                        .block_on(redis::cmd("PING").query_async(&mut conn))
                        .unwrap();
                })
            });

            // Founding through the script, timed by hand: each founding grows
            // the population by one group.
            let fresh = founders(500, n);
            let started = Instant::now();
            let mut next = 10_000_000_000i64;
            for f in &fresh {
                next += 1;
                rt.block_on(index.decide(f, Some(GroupId(next)))).unwrap();
            }
            println!(
                "found/redis/{n}: {:.1} us per founding (500 foundings)",
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
            // (e) Postgres alone: GIN overlap query, exact overlap, insert when
            // founding, all under one advisory lock.
            rt.block_on(async {
                let sink = pg
                    .copy_in("COPY groups (id, attributes) FROM STDIN")
                    .await
                    .unwrap();
                let mut buf = String::new();
                for (id, a) in &all[loaded..n] {
                    buf.push_str(&format!("{}\t{{{}}}\n", id.0, a.to_strings().join(",")));
                }
                use futures_util::SinkExt;
                let mut sink = Box::pin(sink);
                sink.send(bytes::Bytes::from(buf)).await.unwrap();
                sink.as_mut().finish().await.unwrap();
                pg.batch_execute("ANALYZE groups").await.unwrap();
            });
            loaded = n;
            let query = "SELECT id, (SELECT count(*) FROM unnest(attributes) a WHERE a = ANY($1)) AS m \
                     FROM groups WHERE attributes && $1 ORDER BY m DESC, id LIMIT 1";
            group.bench_function(BenchmarkId::new("postgres", n), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                let attrs = queries[i].to_strings();
                rt.block_on(async {
                    pg.batch_execute("BEGIN; SELECT pg_advisory_xact_lock(4242)").await.unwrap();
                    let row = pg.query_opt(query, &[&attrs]).await.unwrap();
                    let joins = row.as_ref().is_some_and(|r| r.get::<_, i64>(1) >= 3);
                    if !joins {
                        pg.execute(
                            "INSERT INTO groups (id, attributes) VALUES (nextval('group_ids') + 100000000, $1)",
                            &[&attrs],
                        )
                        .await
                        .unwrap();
                    }
                    pg.batch_execute("COMMIT").await.unwrap();
                    black_box(row)
                })
            })
        });

            // Reindex from Postgres, the real path.
            let index = RedisIndex::new(conn.clone(), "bench:", threshold(), 65_536);
            let report = rt
                .block_on(index.rebuild(&pg_admin.1, &|_, _| {}))
                .unwrap()
                .unwrap();
            println!(
                "reindex/redis-from-postgres/{n}: {:.0} groups/s ({} groups)",
                report.groups as f64 / report.elapsed.as_secs_f64(),
                report.groups
            );
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
