//! `arpg serve` and `arpg load-test`: flag mapping onto the `arpg-serve` crate.

use crate::args::{DeviceArgs, ModelArgs, VqArgs};
use anyhow::{bail, Result};
use arpg_serve::api::Limits;
use arpg_serve::engine::Engine;
use arpg_serve::load::LoadConfig;
use arpg_serve::ServeConfig;
use clap::Args;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Address to listen on (loopback by default; anything else needs --allow-remote).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 = any free port; the address is printed as `listening on http://...`).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Listen on a non-loopback --host.
    #[arg(long)]
    pub allow_remote: bool,
    /// Bearer token every endpoint requires (`Authorization: Bearer KEY`), but the static
    /// page, which asks for it. Also read from ARPG_API_KEY.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body: usize,
    /// Most images one request may ask for.
    #[arg(long, default_value_t = 64)]
    pub max_images: usize,
    /// Largest side of an uploaded image, pixels (checked before decoding).
    #[arg(long, default_value_t = 2048)]
    pub max_image_side: u32,
    /// Requests waiting for the model before new ones are answered 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Most images decoded in one batch.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Milliseconds the worker waits after the oldest queued request for compatible ones.
    #[arg(long, default_value_t = 10)]
    pub batch_window_ms: u64,
    /// Seconds a request may take, queueing included (504 after).
    #[arg(long, default_value_t = 300)]
    pub request_timeout_s: u64,
    /// Test hook: requests with this seed panic inside the model worker.
    #[arg(long, hide = true)]
    pub panic_on_seed: Option<u64>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    arpg_serve::check_host(a.host, a.allow_remote)?;
    let mut spec = a.model.spec(0);
    let name = spec.display_name();
    spec.or_default();
    let tokenizer = a.vq.spec(spec.random, 0)?;
    let loaded = arpg::zoo::Loaded::load(&spec, &tokenizer, &a.device.placement())?;
    let cfg = ServeConfig {
        model_name: name,
        api_key: arpg_serve::api_key_or_env(a.api_key),
        max_body: a.max_body,
        limits: Limits {
            max_images: a.max_images,
            max_image_side: a.max_image_side,
            max_outpaint: 4,
        },
        max_queue: a.max_queue,
        batch_window: Duration::from_millis(a.batch_window_ms),
        max_batch: a.max_batch,
        request_timeout: Duration::from_secs(a.request_timeout_s),
        panic_seed: a.panic_on_seed,
    };
    let engine = Engine {
        model: loaded.model,
        tokenizer: loaded.tokenizer,
        device: loaded.device,
    };
    let addr = SocketAddr::new(a.host, a.port);
    arpg_serve::run_blocking(addr, engine, cfg.normalized())
}

#[derive(Args, Debug)]
pub struct LoadTestArgs {
    /// The server (loopback only), e.g. http://127.0.0.1:8000.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    #[arg(long, default_value = "/v1/generate")]
    pub path: String,
    /// Request body; `{i}` becomes the request's index, `{c}` the index modulo 10.
    #[arg(
        long,
        default_value = r#"{"classes":[{c}],"per_class":1,"steps":16,"seed":{i}}"#
    )]
    pub body: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 256)]
    pub requests: usize,
    /// Bearer token (also read from ARPG_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
}

pub fn load_test(a: LoadTestArgs) -> Result<()> {
    let report = arpg_serve::load::run_blocking(LoadConfig {
        addr: LoadConfig::addr_of(&a.url)?,
        path: a.path,
        body: a.body,
        clients: a.clients,
        requests: a.requests,
        api_key: arpg_serve::api_key_or_env(a.api_key),
    })?;
    println!("{}", serde_json::to_string(&report)?);
    if report.errors > 0 {
        bail!("{} of {} requests failed", report.errors, report.requests);
    }
    Ok(())
}
