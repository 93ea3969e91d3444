//! The command line: `serve` (the default), `migrate`, `reindex`, `verify`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use cohort::config::{Cli, Command, Config, Mode};
use cohort::index::redis::{self as redis_index, RedisIndex};
use cohort::startup::Application;
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
    let (command, settings) = match cli.command {
        None => ("serve", cli.settings),
        Some(Command::Serve {
            no_migrate,
            settings,
        }) => (
            if no_migrate {
                "serve-no-migrate"
            } else {
                "serve"
            },
            settings,
        ),
        Some(Command::Migrate { settings }) => ("migrate", settings),
        Some(Command::Reindex { settings }) => ("reindex", settings),
        Some(Command::Verify { settings }) => ("verify", settings),
    };
    let config = match settings.validate() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("cohort: {msg}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.settings.log_format, !command.starts_with("serve"));
    let result = match command {
        "serve" | "serve-no-migrate" => serve(config, command == "serve").await,
        "migrate" => migrate(config).await,
        "reindex" => reindex(config).await,
        _ => verify(config).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cohort {command} failed");
            eprintln!("cohort: {e:#}");
            ExitCode::FAILURE
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
            PgStore::connect(database_url, 4).map_err(|e| anyhow::anyhow!(e))?,
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
            cohort::startup::embedded(&config).await?;
            tracing::info!("embedded database migrated");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn redis(config: &Config) -> anyhow::Result<RedisIndex> {
    let Mode::Distributed { redis_url, .. } = &config.mode else {
        unreachable!("checked by the caller")
    };
    let conn = redis_index::connect(redis_url).await?;
    Ok(RedisIndex::new(
        conn,
        &config.settings.redis_prefix,
        config.threshold,
        config.settings.index_buckets,
    ))
}

async fn reindex(config: Config) -> anyhow::Result<ExitCode> {
    let Some(store) = pg(&config)? else {
        println!(
            "embedded mode: the in-process index is rebuilt from the database at every start; nothing to do"
        );
        return Ok(ExitCode::SUCCESS);
    };
    store.migrate().await.map_err(|e| anyhow::anyhow!(e))?;
    let index = redis(&config).await?;
    let progress = Progress::new();
    let report = index
        .rebuild(&store, &|done, total| progress.update(done, total))
        .await?;
    progress.finish();
    match report {
        Some(r) => {
            let rate = r.groups as f64 / r.elapsed.as_secs_f64().max(1e-9);
            println!(
                "reindexed {} groups into epoch {} ({} buckets) in {:.2}s: {:.0} groups/s",
                r.groups,
                r.epoch.0,
                r.buckets,
                r.elapsed.as_secs_f64(),
                rate
            );
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!(
                "cohort: another process is rebuilding the index right now; try again when it is done"
            );
            Ok(ExitCode::from(3))
        }
    }
}

async fn verify(config: Config) -> anyhow::Result<ExitCode> {
    let Some(store) = pg(&config)? else {
        println!(
            "embedded mode: the in-process index is rebuilt from the database at every start; nothing to verify"
        );
        return Ok(ExitCode::SUCCESS);
    };
    let index = redis(&config).await?;
    let report = index.verify(&store).await?;
    if report.problems.is_empty() {
        println!(
            "index and database agree ({} groups checked)",
            report.groups_checked
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "index and database differ ({} groups checked, {} problems):",
            report.groups_checked,
            report.problems.len()
        );
        for p in &report.problems {
            println!("- {p}");
        }
        Ok(ExitCode::FAILURE)
    }
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
