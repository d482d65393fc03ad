//! A bounded load test against a server on loopback: `clients` concurrent connections send
//! `requests` requests in all, then it stops and reports throughput, latency and the batch
//! sizes the server reached (from its `/metrics`). Plain HTTP/1.1 over tokio, loopback only.

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server; must be a loopback address.
    pub addr: SocketAddr,
    pub path: String,
    /// JSON body; every `{i}` becomes the request's index (e.g. as its seed), `{c}` the
    /// index modulo 10 (a digits class).
    pub body: String,
    pub clients: usize,
    pub requests: usize,
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub requests: usize,
    pub errors: usize,
    pub statuses: std::collections::BTreeMap<u16, usize>,
    pub images: usize,
    pub wall_s: f64,
    pub requests_per_s: f64,
    pub images_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// Batches the server decoded during the run, and their mean and largest size.
    pub batches: f64,
    pub mean_batch_images: f64,
    pub max_batch_images_bucket: Option<f64>,
}

impl LoadConfig {
    /// The server of `url` (`http://127.0.0.1:PORT`; `localhost` is taken as 127.0.0.1).
    pub fn addr_of(url: &str) -> Result<SocketAddr> {
        let hostport = url
            .strip_prefix("http://")
            .context("--url must start with http://")?
            .trim_end_matches('/');
        hostport
            .replace("localhost", "127.0.0.1")
            .parse()
            .with_context(|| format!("--url {url}: expected http://127.0.0.1:PORT"))
    }
}

/// [`run`] on a runtime of its own.
pub fn run_blocking(cfg: LoadConfig) -> Result<LoadReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cfg))
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    api_key: Option<&str>,
) -> Result<(u16, Vec<u8>)> {
    ensure!(
        addr.ip().is_loopback(),
        "the load test only talks to loopback"
    );
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = api_key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    let head = std::str::from_utf8(&buf[..split])?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl])?.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
}

/// (count, sum, largest bucket bound holding a batch) of `arpg_batch_images`.
fn batch_stats(metrics: &str) -> (f64, f64, Vec<(f64, f64)>) {
    let mut count = 0.0;
    let mut sum = 0.0;
    let mut buckets = Vec::new();
    for line in metrics.lines() {
        let val = |l: &str| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if line.starts_with("arpg_batch_images_count") {
            count = val(line);
        } else if line.starts_with("arpg_batch_images_sum") {
            sum = val(line);
        } else if let Some(rest) = line.strip_prefix("arpg_batch_images_bucket{le=\"") {
            if let Some((le, _)) = rest.split_once('"') {
                if let Ok(le) = le.parse::<f64>() {
                    buckets.push((le, val(line)));
                }
            }
        }
    }
    (count, sum, buckets)
}

pub async fn run(cfg: LoadConfig) -> Result<LoadReport> {
    if !cfg.addr.ip().is_loopback() {
        bail!("the load test only talks to loopback (127.0.0.1 / ::1)");
    }
    ensure!(
        cfg.clients > 0 && cfg.requests > 0,
        "clients and requests must be positive"
    );
    let key = cfg.api_key.clone();
    let metrics = |k: Option<String>| async move {
        let (_, b) = request(cfg.addr, "GET", "/metrics", "", k.as_deref()).await?;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&b).to_string())
    };
    let before = batch_stats(&metrics(key.clone()).await?);
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::<(u16, Duration, usize)>::new()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cfg.clients {
        let (next, results, cfg) = (next.clone(), results.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cfg.requests {
                    return;
                }
                let body = cfg
                    .body
                    .replace("{i}", &i.to_string())
                    .replace("{c}", &(i % 10).to_string());
                let t = Instant::now();
                let (status, images) =
                    match request(cfg.addr, "POST", &cfg.path, &body, cfg.api_key.as_deref()).await
                    {
                        Ok((s, b)) => {
                            let n = serde_json::from_slice::<serde_json::Value>(&b)
                                .ok()
                                .and_then(|v| v["images"].as_array().map(|a| a.len()))
                                .unwrap_or(0);
                            (s, n)
                        }
                        Err(_) => (0, 0),
                    };
                results.lock().unwrap().push((status, t.elapsed(), images));
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let after = batch_stats(&metrics(key).await?);
    let r = results.lock().unwrap().clone();
    let mut lat: Vec<f64> = r.iter().map(|x| x.1.as_secs_f64() * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let mut statuses = std::collections::BTreeMap::new();
    for x in &r {
        *statuses.entry(x.0).or_insert(0) += 1;
    }
    let images: usize = r.iter().map(|x| x.2).sum();
    let batches = after.0 - before.0;
    let max_bucket = after
        .2
        .iter()
        .zip(before.2.iter().map(|b| b.1).chain(std::iter::repeat(0.0)))
        .map(|(a, b)| (a.0, a.1 - b))
        .collect::<Vec<_>>();
    // The smallest bound holding every batch of the run.
    let max_batch_images_bucket = max_bucket
        .iter()
        .find(|(_, n)| *n >= batches && batches > 0.0)
        .map(|b| b.0);
    Ok(LoadReport {
        clients: cfg.clients,
        requests: r.len(),
        errors: r.iter().filter(|x| x.0 != 200).count(),
        statuses,
        images,
        wall_s: wall,
        requests_per_s: r.len() as f64 / wall,
        images_per_s: images as f64 / wall,
        latency_p50_ms: pct(0.5),
        latency_p99_ms: pct(0.99),
        latency_max_ms: *lat.last().unwrap_or(&0.0),
        batches,
        mean_batch_images: if batches > 0.0 {
            (after.1 - before.1) / batches
        } else {
            0.0
        },
        max_batch_images_bucket,
    })
}
