//! One process per GPU: `--gpus N` re-runs this command line N times with the launcher
//! variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun
//! would; a command started by an outside launcher reads the same variables.

use anyhow::{bail, Context, Result};
use std::process::{Child, Command};
use std::time::Duration;

pub use arpg::train::dist::DistEnv as Dist;

/// This process's place in a multi-process run, if it is one.
pub fn from_env() -> Result<Option<Dist>> {
    Dist::from_env()
}

/// Whether `--gpus n` asks this process to launch workers rather than work itself.
pub fn should_spawn(gpus: usize) -> Result<bool> {
    if gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    Ok(gpus > 1 && from_env()?.is_none())
}

/// The device of a worker: `cuda:LOCAL_RANK` (a worker has a GPU of its own).
pub fn worker_device(d: &Dist) -> String {
    format!("cuda:{}", d.local_rank)
}

/// Re-executes the current command line once per GPU with the launcher variables set,
/// waits for all, and fails (stopping the others, which would wait on the dead rank
/// forever) as soon as one fails.
pub fn spawn_workers(n: usize) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable to re-run it")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p,
        Err(_) => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
            .to_string(),
    };
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    eprintln!("launching {n} processes (one per GPU), rendezvous at {addr}:{port}");
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", &port)
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(Some(child));
    }
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    while children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot {
                if let Some(status) = c.try_wait()? {
                    *slot = None;
                    if !status.success() && failed.is_none() {
                        failed = Some((rank, status));
                    }
                }
            }
        }
        if failed.is_some() {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match failed {
        // Ctrl-C reaches every worker; they stop together and exit 130.
        Some((_, s)) if s.code() == Some(130) => std::process::exit(130),
        Some((rank, s)) => bail!("rank {rank} failed ({s}); stopped the other ranks"),
        None => Ok(()),
    }
}
