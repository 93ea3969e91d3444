//! What an import tells its user: a progress bar on a terminal (rate, ETA),
//! plain periodic lines otherwise, the reject file, and the final summary
//! (text, or JSON with `--json`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::line::Reject;

/// Seconds between two plain progress lines.
const LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Lines read (blank lines excluded).
    pub lines: u64,
    /// Users this run created.
    pub imported: u64,
    /// Of those, users who joined an existing group.
    pub joined: u64,
    /// Of those, users who founded a group.
    pub founded: u64,
    /// Lines whose user an earlier run (or an earlier identical line)
    /// already imported: skipped.
    pub already_imported: u64,
    pub rejected: u64,
    pub elapsed_seconds: f64,
    /// Imported users per second.
    pub users_per_second: f64,
    pub rejects_file: Option<PathBuf>,
}

impl Summary {
    pub fn finish(&mut self, elapsed: Duration) {
        self.elapsed_seconds = elapsed.as_secs_f64();
        self.users_per_second = self.imported as f64 / self.elapsed_seconds.max(1e-9);
    }

    pub fn human(&self) -> String {
        let mut s = format!(
            "imported {} users ({} joined a group, {} founded one) in {:.1} s: {:.0} users/s",
            self.imported, self.joined, self.founded, self.elapsed_seconds, self.users_per_second
        );
        if self.already_imported > 0 {
            s.push_str(&format!(
                "; {} already imported (skipped)",
                self.already_imported
            ));
        }
        match (&self.rejects_file, self.rejected) {
            (_, 0) => s.push_str("; no line rejected"),
            (Some(p), n) => s.push_str(&format!("; {n} lines rejected, listed in {}", p.display())),
            (None, n) => s.push_str(&format!("; {n} lines rejected")),
        }
        s
    }
}

/// The reject file: one JSON object a line (`line`, `username` when there
/// was one, `reason`), never the password. Created anew (mode 0600) by
/// each run, which finds the same rejects again.
pub struct Rejects {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl Rejects {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            path: path.to_owned(),
            out: std::io::BufWriter::new(f),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, r: &Reject) -> std::io::Result<()> {
        let v = serde_json::json!({"line": r.line, "username": r.username, "reason": r.reason});
        serde_json::to_writer(&mut self.out, &v)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_log: Instant,
    total_bytes: Option<u64>,
}

impl Progress {
    /// `total_bytes`: the file's size (none for standard input).
    pub fn new(total_bytes: Option<u64>, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = match total_bytes {
                Some(n) => {
                    let b = indicatif::ProgressBar::new(n);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{bar:40} {percent:>3}% {msg} eta {eta}",
                        )
                        .expect("valid template"),
                    );
                    b
                }
                None => {
                    let b = indicatif::ProgressBar::new_spinner();
                    b.set_style(
                        indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                            .expect("valid template"),
                    );
                    b
                }
            };
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Self {
            bar,
            started: Instant::now(),
            last_log: Instant::now(),
            total_bytes,
        }
    }

    pub fn update(&mut self, bytes: u64, s: &Summary) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = s.imported as f64 / secs;
        let msg = format!(
            "{} imported, {} skipped, {} rejected, {:.0} users/s",
            s.imported, s.already_imported, s.rejected, rate
        );
        match &self.bar {
            Some(b) => {
                b.set_position(bytes);
                b.set_message(msg);
            }
            None => {
                if self.last_log.elapsed() >= LOG_EVERY {
                    self.last_log = Instant::now();
                    let pct = self
                        .total_bytes
                        .filter(|&t| t > 0)
                        .map(|t| format!("{:.1}% of the file, ", 100.0 * bytes as f64 / t as f64))
                        .unwrap_or_default();
                    eprintln!("cohort import: {pct}{} lines, {msg}", s.lines);
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
