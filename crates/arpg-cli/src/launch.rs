//! `--gpus N`: one process per GPU ([`arpg::train::dist::spawn_workers`]); a command started
//! by an outside launcher reads the same variables (RANK, WORLD_SIZE, LOCAL_RANK, ...).

use anyhow::Result;

pub use arpg::train::dist::should_spawn;

/// Runs the workers; when Ctrl-C stopped them, this process exits as they did (130).
pub fn spawn_workers(n: usize) -> Result<()> {
    if !arpg::train::dist::spawn_workers(n)? {
        std::process::exit(130);
    }
    Ok(())
}
