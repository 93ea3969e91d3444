//! The command line: `serve` (the default), `migrate`, `reindex`, `verify`,
//! `set-threshold`, `import`, `stats`, `completions`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use cohort::config::{Cli, Command, Config, Mode};
use cohort::domain::Threshold;
use cohort::index::IndexSource;
use cohort::index::redis::RedisIndex;
use cohort::index::redis::conn::RedisConn;
use cohort::startup::Application;
use cohort::store::Store;
use cohort::store::postgres::PgStore;
use cohort::telemetry::init_logging;

// mimalloc: faster than glibc's allocator for the in-process index's large
// tables and the reindex's many small allocations, and with
// MIMALLOC_LARGE_OS_PAGES=1 (set by .cargo/config.toml and the Dockerfile)
// it backs them with 2 MiB pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Completions { shell }) = cli.command {
        use clap::CommandFactory;
        clap_complete::generate(shell, &mut Cli::command(), "cohort", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let command = cli.command.unwrap_or(Command::Serve {
        no_migrate: false,
        settings: cli.settings,
    });
    let (name, settings) = match &command {
        Command::Serve { settings, .. } => ("serve", settings),
        Command::Migrate { settings } => ("migrate", settings),
        Command::Reindex { settings, .. } => ("reindex", settings),
        Command::Verify { settings, .. } => ("verify", settings),
        Command::SetThreshold { settings, .. } => ("set-threshold", settings),
        Command::Import { settings, .. } => ("import", settings),
        Command::Stats { settings, .. } => ("stats", settings),
        Command::Completions { .. } => unreachable!("handled above"),
    };
    let config = match settings.clone().validate() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("cohort: {msg}");
            return ExitCode::from(2);
        }
    };
    // Flushes the spans still queued when dropped, at the end of main.
    let _traces = match init_logging(config.settings.log_format, name != "serve") {
        Ok(g) => g,
        Err(msg) => {
            eprintln!("cohort: {msg}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Serve { no_migrate, .. } => serve(config, !no_migrate).await,
        Command::Migrate { .. } => migrate(config).await,
        Command::Reindex { from_scratch, .. } => reindex(config, from_scratch).await,
        Command::Verify { json, .. } => verify(config, json).await,
        Command::SetThreshold { threshold, .. } => set_threshold(config, threshold).await,
        Command::Import {
            file,
            rejects,
            batch,
            json,
            decide,
            ..
        } => import(config, file, rejects, batch, json, decide).await,
        Command::Stats { json, top, .. } => stats(config, json, top).await,
        Command::Completions { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cohort {name} failed");
            eprintln!("cohort: {e:#}");
            // `verify`, `import` and `stats` promise 2 for "could not run";
            // the others use 1.
            ExitCode::from(if matches!(name, "verify" | "import" | "stats") {
                2
            } else {
                1
            })
        }
    }
}

async fn serve(config: Config, migrate: bool) -> anyhow::Result<ExitCode> {
    let app = Application::build(config, migrate).await?;
    app.run_until_stopped().await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn pg(config: &Config) -> anyhow::Result<Option<PgStore>> {
    match &config.mode {
        Mode::Distributed { database_url, .. } => Ok(Some(
            PgStore::connect_with(
                database_url,
                config.settings.tls_ca_file.as_deref(),
                4,
                config.threshold,
            )
            .map_err(|e| anyhow::anyhow!(e))?,
        )),
        Mode::Embedded { .. } => Ok(None),
    }
}

async fn migrate(config: Config) -> anyhow::Result<ExitCode> {
    match pg(&config)? {
        Some(store) => {
            let n = store.migrate().await.map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(applied = n, "migrations applied");
        }
        None => {
            // Opening the embedded store migrates it.
            cohort::startup::embedded(&config, &cohort::telemetry::Metrics::new()).await?;
            tracing::info!("embedded database migrated");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn redis(config: &Config) -> anyhow::Result<RedisIndex> {
    let Mode::Distributed { redis_url, .. } = &config.mode else {
        unreachable!("checked by the caller")
    };
    let client = cohort::tls::redis(redis_url, config.settings.tls_ca_file.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?;
    let conn = RedisConn::with_client(client, std::time::Duration::from_secs(10));
    Ok(RedisIndex::new(
        Arc::new(conn),
        &config.settings.redis_prefix,
        config.threshold,
    ))
}

async fn reindex(config: Config, from_scratch: bool) -> anyhow::Result<ExitCode> {
    let Some(store) = pg(&config)? else {
        println!(
            "embedded mode: the in-process index is rebuilt from the database at every start; nothing to do"
        );
        return Ok(ExitCode::SUCCESS);
    };
    store.migrate().await.map_err(|e| anyhow::anyhow!(e))?;
    let deployed = store.ensure_deployment(config.threshold).await?;
    if deployed != config.threshold.get() {
        anyhow::bail!(
            "the deployment's threshold is {deployed}, not {}: run with COHORT_MATCH_THRESHOLD={deployed}",
            config.threshold.get()
        );
    }
    let index = redis(&config)?;
    let Some(_lock) = store.lock_sync().await? else {
        eprintln!(
            "cohort: another process is syncing the index right now; try again when it is done"
        );
        return Ok(ExitCode::from(3));
    };
    // Every dirty mark up to here is covered by the sync below.
    let marks = store.marks().await?;
    let (server, _) = index.server_identity().await?;
    if from_scratch {
        // Readers stop trusting the index at once (dirty), then it goes.
        store.mark_dirty().await?;
        let dropped = index.drop_all().await?;
        tracing::info!(dropped, "index dropped");
    }
    let marks = if from_scratch {
        store.marks().await?
    } else {
        marks
    };
    let progress = Progress::new();
    let r = index
        .sync(&store, config.settings.index_buckets, &|done, total| {
            progress.update(done, total)
        })
        .await?;
    progress.finish();
    store.mark_synced(marks.dirty, &server).await?;
    let rate = r.full_pass as f64 / r.elapsed.as_secs_f64().max(1e-9);
    if r.full_pass == 0 {
        println!(
            "index already current; {} unconfirmed groups added ({} buckets, {:.2}s)",
            r.unindexed,
            r.buckets,
            r.elapsed.as_secs_f64()
        );
    } else {
        println!(
            "reindexed {} groups ({} buckets) in {:.2}s: {:.0} groups/s",
            r.full_pass,
            r.buckets,
            r.elapsed.as_secs_f64(),
            rate
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_threshold(config: Config, threshold: usize) -> anyhow::Result<ExitCode> {
    let t = Threshold::new(threshold, config.rules.max).map_err(|e| anyhow::anyhow!(e))?;
    let Some(store) = pg(&config)? else {
        // Embedded: the data directory's lock keeps the server out (stop it
        // first).
        let (store, _lock) = cohort::startup::embedded_store(&config)?;
        let (old, groups) = store.set_threshold(t).await?;
        println!(
            "threshold changed from {old} to {threshold}; subset table rebuilt for {groups} groups. \
             Start cohort with COHORT_MATCH_THRESHOLD={threshold}."
        );
        return Ok(ExitCode::SUCCESS);
    };
    store.migrate().await.map_err(|e| anyhow::anyhow!(e))?;
    let (old, groups) = store.set_threshold(t).await?;
    println!(
        "threshold changed from {old} to {threshold}; subset table rebuilt for {groups} groups. \
         Roll the replicas out with COHORT_MATCH_THRESHOLD={threshold}; the index for the new \
         threshold is built by the first of them (signups decide from the database meanwhile)."
    );
    Ok(ExitCode::SUCCESS)
}

/// `cohort verify --json`'s report: one object on standard output.
#[derive(serde::Serialize)]
struct VerifyJson {
    /// "agree", "differ" or "error" (exit 0, 1, 2).
    result: &'static str,
    /// "distributed" or "embedded" (nothing to verify there).
    mode: &'static str,
    groups_checked: u64,
    problems: Vec<String>,
    /// Why it could not run (result "error").
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn verify(config: Config, json: bool) -> anyhow::Result<ExitCode> {
    let print = |r: &VerifyJson| match serde_json::to_string(r) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("cohort: {e}"),
    };
    // None: embedded mode, nothing to verify.
    let outcome = async {
        let Some(store) = pg(&config)? else {
            return Ok(None);
        };
        anyhow::Ok(Some(redis(&config)?.verify(&store).await?))
    }
    .await;
    let report = match outcome {
        Ok(Some(r)) => r,
        Ok(None) => {
            if json {
                print(&VerifyJson {
                    result: "agree",
                    mode: "embedded",
                    groups_checked: 0,
                    problems: vec![],
                    error: None,
                });
            } else {
                println!(
                    "embedded mode: the in-process index is rebuilt from the database at every start; nothing to verify"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) if json => {
            tracing::error!(error = format!("{e:#}"), "cohort verify failed");
            print(&VerifyJson {
                result: "error",
                mode: "distributed",
                groups_checked: 0,
                problems: vec![],
                error: Some(format!("{e:#}")),
            });
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e),
    };
    let agree = report.problems.is_empty();
    if json {
        print(&VerifyJson {
            result: if agree { "agree" } else { "differ" },
            mode: "distributed",
            groups_checked: report.groups_checked,
            problems: report.problems,
            error: None,
        });
    } else if agree {
        println!(
            "index and database agree ({} groups checked)",
            report.groups_checked
        );
    } else {
        println!(
            "index and database differ ({} groups checked, {} problems):",
            report.groups_checked,
            report.problems.len()
        );
        for p in &report.problems {
            println!("- {p}");
        }
    }
    Ok(if agree {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn import(
    config: Config,
    file: std::path::PathBuf,
    rejects: Option<std::path::PathBuf>,
    batch: usize,
    json: bool,
    decide: cohort::import::Decide,
) -> anyhow::Result<ExitCode> {
    let opts = cohort::import::Options {
        file,
        rejects,
        batch,
        json,
        decide,
    };
    let summary = cohort::import::run(config, opts).await?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary.human());
    }
    Ok(ExitCode::from(if summary.rejected == 0 { 0 } else { 1 }))
}

async fn stats(config: Config, json: bool, top: usize) -> anyhow::Result<ExitCode> {
    let stats = match pg(&config)? {
        Some(store) => store.stats(top).await?,
        None => {
            let Mode::Embedded { data_dir } = &config.mode else {
                unreachable!("pg() is None only in embedded mode")
            };
            // Read-only, without the data directory's lock (see
            // `store::sqlite::stats`): it runs beside a server.
            let db = data_dir.join("cohort.sqlite3");
            tokio::task::spawn_blocking(move || {
                cohort::store::sqlite::stats::stats_of_file(&db, top)
            })
            .await??
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", stats.human());
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on a terminal, plain log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_logged: std::sync::Mutex<u64>,
}

impl Progress {
    fn new() -> Arc<Self> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} groups {per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            b
        });
        Arc::new(Self {
            bar,
            last_logged: std::sync::Mutex::new(0),
        })
    }

    fn update(&self, done: u64, total: u64) {
        match &self.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
            }
            None => {
                let mut last = self.last_logged.lock().expect("progress mutex");
                if done >= *last + 100_000 || done == total {
                    *last = done;
                    tracing::info!(done, total, "reindex progress");
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
