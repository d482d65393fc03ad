//! Small shared helpers: random numbers, atomic writes, Ctrl-C.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// `WxH` (e.g. `32x16`) as (width, height): for flags such as `--grid`.
pub fn parse_wxh(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("{s:?}: expected WxH, e.g. 32x16");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let p = |v: &str| v.trim().parse::<usize>().map_err(|_| bad());
    Ok((p(w)?, p(h)?))
}

/// Standard normal by Box-Muller.
pub fn normal<R: rand::Rng>(rng: &mut R) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Write `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, "file", |w| Ok(w.write_all(bytes)?))
}

/// Write `path` atomically: through a temporary file in the same folder, then a rename, so an
/// interrupted run never leaves a half-written file under the final name. `what` names the
/// kind of file in errors.
pub fn write_atomic_with(
    path: &Path,
    what: &str,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    // A second Ctrl-C waits for the write to finish instead of orphaning the temporary file.
    let _busy = Critical::enter();
    let mut tmp = temp_beside(path)?;
    {
        let mut buf = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut buf).with_context(|| format!("cannot write {what} {}", path.display()))?;
        buf.flush()
            .with_context(|| format!("cannot write {what} {}", path.display()))?;
    }
    persist_atomic(tmp, path, what)
}

/// A temporary file in `path`'s folder (created if needed), to be renamed over `path` by
/// [`persist_atomic`] once complete.
pub fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    tempfile::NamedTempFile::new_in(dir).with_context(|| {
        format!(
            "cannot create a temporary file in {} for {}",
            dir.display(),
            path.display()
        )
    })
}

/// Sync `tmp`, make it readable like any other output, and rename it over `path`.
pub fn persist_atomic(tmp: tempfile::NamedTempFile, path: &Path, what: &str) -> Result<()> {
    let _busy = Critical::enter();
    test_hook_slow_persist();
    tmp.as_file().sync_all().ok();
    // Temporary files are created 0600; outputs should be readable like any other file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .ok();
    }
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move {what} into place at {}", path.display()))?;
    Ok(())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CRITICAL: AtomicUsize = AtomicUsize::new(0);
static EXIT_PENDING: AtomicBool = AtomicBool::new(false);

/// Exit code of a run stopped by Ctrl-C.
pub const EXIT_INTERRUPTED: i32 = 130;

/// While one is alive, [`interrupt_again`] defers the exit until the last one is dropped, so
/// that an output being written (a checkpoint, an archive) is completed, never orphaned.
pub struct Critical(());

impl Critical {
    pub fn enter() -> Self {
        CRITICAL.fetch_add(1, Ordering::SeqCst);
        Critical(())
    }
}

impl Drop for Critical {
    fn drop(&mut self) {
        if CRITICAL.fetch_sub(1, Ordering::SeqCst) == 1 && EXIT_PENDING.load(Ordering::SeqCst) {
            eprintln!("output complete; exiting");
            std::process::exit(EXIT_INTERRUPTED);
        }
    }
}

/// The CLI's second Ctrl-C: exit now, or once the outputs being written are complete.
pub fn interrupt_again() {
    EXIT_PENDING.store(true, Ordering::SeqCst);
    if CRITICAL.load(Ordering::SeqCst) == 0 {
        std::process::exit(EXIT_INTERRUPTED);
    }
    eprintln!("\ninterrupted again: exiting as soon as the file being written is complete");
}

/// Tests only: `ARPG_TEST_SLOW_PERSIST_MS` stretches every atomic write, so that a test can
/// interrupt one deterministically.
fn test_hook_slow_persist() {
    if let Some(ms) = std::env::var("ARPG_TEST_SLOW_PERSIST_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Create a command's output folder `--out` (and its parents), the error naming the flag.
pub fn create_out(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create --out {}", dir.display()))
}

/// Check, before the expensive work, that an output can be written at `path` (its folder
/// exists or can be made, a temporary file can be created there, the path is not a folder).
pub fn check_writable(path: &Path, flag: &str) -> Result<()> {
    anyhow::ensure!(
        !path.is_dir(),
        "{flag} {} is a folder, not a file",
        path.display()
    );
    temp_beside(path).with_context(|| format!("{flag} {} cannot be written", path.display()))?;
    Ok(())
}

/// Open `path` for reading if it is a regular file (not a folder, a device such as /dev/zero
/// or a pipe, which would be read forever). `what` names the file in errors.
pub fn open_regular(path: &Path, what: &str) -> Result<std::fs::File> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open {what} {}", path.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    anyhow::ensure!(
        md.is_file(),
        "{what} {} is not a regular file",
        path.display()
    );
    Ok(f)
}

/// Read a small file whole (a config, a token list, an order): refuses what is not a regular
/// file or is larger than `limit` bytes, instead of reading until memory runs out.
pub fn read_small(path: &Path, limit: u64, what: &str) -> Result<String> {
    use std::io::Read;
    let f = open_regular(path, what)?;
    let len = f.metadata()?.len();
    anyhow::ensure!(
        len <= limit,
        "{what} {} is {len} bytes, more than the {limit} accepted",
        path.display()
    );
    let mut s = String::new();
    f.take(limit + 1)
        .read_to_string(&mut s)
        .with_context(|| format!("cannot read {what} {} (is it UTF-8 text?)", path.display()))?;
    anyhow::ensure!(
        s.len() as u64 <= limit,
        "{what} {} is more than the {limit} bytes accepted",
        path.display()
    );
    Ok(s)
}

/// Memory of this machine (RAM and swap), in bytes; None where it cannot be read.
pub fn memory_bytes() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u128> {
        text.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) * 1024)
}

/// Refuse a request that would need more memory than the machine has, before allocating:
/// `what` says what would be allocated (shown with the amount).
pub fn check_memory(bytes: u128, what: &str) -> Result<()> {
    let have = memory_bytes().unwrap_or(1 << 50);
    if bytes > have {
        anyhow::bail!(
            "{what} would need {}, more than this machine's {} of memory",
            human_bytes(bytes),
            human_bytes(have)
        );
    }
    Ok(())
}

pub fn human_bytes(b: u128) -> String {
    let gib = b as f64 / (1u64 << 30) as f64;
    if gib >= 1024.0 * 1024.0 {
        format!("{:.3e} GiB", gib)
    } else if gib >= 0.1 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// A command's Ctrl-C: the first asks the long loops to finish the unit of work in hand,
/// write what is done and stop ([`interrupt`]); the second exits ([`interrupt_again`]).
pub fn on_ctrl_c() {
    if interrupted() {
        interrupt_again();
        return;
    }
    eprintln!("\ninterrupted: finishing the current batch, then stopping (Ctrl-C again to abort)");
    interrupt();
}

/// A command's process set-up: one candle CPU worker unless `CANDLE_NUM_THREADS` says
/// otherwise, and logging to stderr (`RUST_LOG`) with the profile layer when profiling.
pub fn init_process() {
    // candle's CPU worker pool spins while waiting; next to gemm's own threads on a small
    // machine that halves throughput (measured 2.2x faster training with 1 on 2 cores).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    use tracing_subscriber::prelude::*;
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::EnvFilter::from_default_env());
    // ARPG_PROFILE: per-part times of the library's spans (`arpg bench` prints them).
    let profile = profiling().then(profile_layer);
    tracing_subscriber::registry()
        .with(log)
        .with(profile)
        .init();
}

/// Set by the CLI's Ctrl-C handler; long loops check it between units of work.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Whether `ARPG_PROFILE` asks for the per-part profile.
pub fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("ARPG_PROFILE").is_some())
}

/// With profiling on: a device that [`profile_layer`] synchronises around each span, so that
/// a span's time is its GPU work's, not its launches'.
pub fn watch_device(device: &candle_core::Device) {
    if profiling() && !device.is_cpu() {
        WATCHED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(device.clone());
    }
}

static WATCHED: std::sync::Mutex<Vec<candle_core::Device>> = std::sync::Mutex::new(Vec::new());

fn sync_watched() {
    for d in WATCHED.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        // A failed sync leaves only this sample inexact; the error surfaces at the next op.
        let _ = d.synchronize();
    }
}

type Profile = std::collections::BTreeMap<&'static str, (f64, usize)>;
static PROFILE: std::sync::Mutex<Profile> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The opt-in profiler (the CLI installs it under `ARPG_PROFILE`): the wall time of each of
/// this crate's tracing spans, the watched devices synchronised at its entry and exit, summed
/// by span name (`model.attention`, `vq.conv3x3`, `train.forward`, ...).
pub fn profile_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    let ours = tracing_subscriber::filter::filter_fn(|m| m.target().starts_with("arpg"));
    Profiler.with_filter(ours)
}

struct Profiler;

/// When a span was entered.
struct Entered(std::time::Instant);

impl<S> tracing_subscriber::Layer<S> for Profiler
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        sync_watched();
        if let Some(span) = ctx.span(id) {
            span.extensions_mut()
                .replace(Entered(std::time::Instant::now()));
        }
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        sync_watched();
        let Some(span) = ctx.span(id) else { return };
        let Some(Entered(t)) = span.extensions_mut().remove::<Entered>() else {
            return;
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(span.name()).or_insert((0.0, 0));
        e.0 += ms;
        e.1 += 1;
    }
}

/// The timings gathered by [`profile_layer`] so far, `span name -> (milliseconds, calls)`;
/// clears them.
pub fn take_profile() -> Profile {
    std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_layer_sums_span_times_by_name() {
        use tracing_subscriber::prelude::*;
        let subscriber = tracing_subscriber::registry().with(profile_layer());
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                let _enter = tracing::trace_span!("test.part").entered();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        let (ms, calls) = take_profile()["test.part"];
        assert_eq!(calls, 3);
        assert!(ms >= 6.0, "{ms} ms");
    }
}

/// What a run's one seed is split into: each purpose draws from a stream of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedFor {
    /// A trainer's fresh weights.
    TrainInit,
    /// A trainer's dropout masks on the CPU (one stream per rank, set on the generator).
    TrainDropout,
    /// The device generator of training rank `r`.
    TrainRank(u64),
    /// The sample permutation of training epoch `e`.
    Epoch(u64),
    /// `--init random`'s VQ tokenizer weights (beside the model's, drawn from `seed`).
    RandomVq,
    /// `sample-fid`'s shard `s`: its images do not depend on who samples it.
    Shard(u64),
}

/// The seed for `purpose` derived from a run's `seed`: the one place the derivations live
/// (the constants are those every earlier version used, so runs repeat bit for bit).
pub fn seed_for(seed: u64, purpose: SeedFor) -> u64 {
    match purpose {
        SeedFor::TrainInit => seed ^ 0xA5A5_0000,
        SeedFor::TrainDropout => seed ^ 0x0D20_9D20,
        SeedFor::TrainRank(r) => seed.wrapping_add(r.wrapping_mul(0x9E37_79B9)),
        SeedFor::Epoch(e) => seed.wrapping_mul(0x9E37_79B9).wrapping_add(e),
        SeedFor::RandomVq => seed ^ 0x5151,
        SeedFor::Shard(s) => {
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ s.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03)
        }
    }
}

#[cfg(test)]
mod seed_tests {
    use super::*;

    #[test]
    fn purposes_get_distinct_streams_with_the_historical_values() {
        let s = 7u64;
        let all = [
            seed_for(s, SeedFor::TrainInit),
            seed_for(s, SeedFor::TrainDropout),
            seed_for(s, SeedFor::TrainRank(1)),
            seed_for(s, SeedFor::Epoch(1)),
            seed_for(s, SeedFor::RandomVq),
            seed_for(s, SeedFor::Shard(1)),
        ];
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
        // The derivations earlier versions used inline (checkpoints and runs depend on them).
        assert_eq!(all[0], 7 ^ 0xA5A5_0000);
        assert_eq!(all[2], 7 + 0x9E37_79B9);
        assert_eq!(
            seed_for(s, SeedFor::Shard(0)),
            7u64.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03
        );
        assert_eq!(seed_for(s, SeedFor::TrainRank(0)), s);
    }
}
