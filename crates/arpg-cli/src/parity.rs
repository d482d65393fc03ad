//! `arpg check-parity`: the reference fixtures on this device and dtype.

use crate::args::DeviceArgs;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ParityArgs {
    /// Folder with a.json and a_arpg.safetensors (tests/fixtures/parity-a).
    #[arg(long, default_value = "tests/fixtures/parity-a")]
    pub fixtures: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(a: ParityArgs) -> Result<()> {
    let (dev, dtype) = a.device.resolve()?;
    let r = arpg::eval::parity::check(&a.fixtures, dtype, &dev)?;
    println!("{}", serde_json::to_string(&r)?);
    let failures = r.failures();
    if !failures.is_empty() {
        anyhow::bail!(
            "parity fails on {} {}: {}",
            r.device,
            r.dtype,
            failures.join("; ")
        );
    }
    eprintln!("parity holds on {} {}", r.device, r.dtype);
    Ok(())
}
