//! Small shared helpers: random numbers, atomic writes, Ctrl-C.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Set by the CLI's Ctrl-C handler; long loops check it between units of work.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Opt-in timing by label (`ARPG_PROFILE=1`): synchronises the device around `f` and adds its
/// wall time to `label`. Without the variable it only calls `f` (one cached lookup).
pub fn timed<T>(
    label: &'static str,
    device: &candle_core::Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("ARPG_PROFILE").is_some()) {
        return f();
    }
    device.synchronize()?;
    let t = std::time::Instant::now();
    let out = f()?;
    device.synchronize()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
    let e = p.entry(label).or_insert((0.0, 0));
    e.0 += ms;
    e.1 += 1;
    Ok(out)
}

type Profile = std::collections::BTreeMap<&'static str, (f64, usize)>;
static PROFILE: std::sync::Mutex<Profile> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The timings gathered by [`timed`] so far, `label -> (milliseconds, calls)`; clears them.
pub fn take_profile() -> Profile {
    std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()))
}
