//! Counters for `GET /metrics`, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Latency buckets, seconds.
const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Batch-size buckets, images.
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, &b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.n);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.n);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batches: Histogram,
    /// (when, images) of recent batches, for images/s over the last minute.
    recent: Vec<(Instant, usize)>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    queue_depth: AtomicU64,
    images: AtomicU64,
    busy_ns: AtomicU64,
    panics: AtomicU64,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn observe_request(&self, endpoint: &str, status: u16, elapsed: Duration) {
        let mut m = self.lock();
        *m.requests
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        m.latency
            .entry(endpoint.to_string())
            .or_default()
            .observe(LATENCY, elapsed.as_secs_f64());
    }

    pub fn set_queue_depth(&self, n: usize) {
        self.queue_depth.store(n as u64, Ordering::Relaxed);
    }

    pub fn observe_batch(&self, images: usize) {
        self.lock().batches.observe(BATCH, images as f64);
    }

    pub fn observe_images(&self, n: usize, took: Duration) {
        self.images.fetch_add(n as u64, Ordering::Relaxed);
        self.busy_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        let mut m = self.lock();
        let now = Instant::now();
        m.recent.push((now, n));
        m.recent
            .retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(60));
    }

    pub fn count_panic(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        out.push_str("# HELP arpg_requests_total HTTP requests by endpoint and status.\n");
        out.push_str("# TYPE arpg_requests_total counter\n");
        for ((e, s), n) in &m.requests {
            let _ = writeln!(
                out,
                "arpg_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        out.push_str("# HELP arpg_request_duration_seconds Request latency by endpoint.\n");
        out.push_str("# TYPE arpg_request_duration_seconds histogram\n");
        for (e, h) in &m.latency {
            h.write(
                &mut out,
                "arpg_request_duration_seconds",
                &format!("endpoint=\"{e}\""),
                LATENCY,
            );
        }
        out.push_str("# HELP arpg_queue_depth Jobs waiting for the model.\n");
        out.push_str("# TYPE arpg_queue_depth gauge\n");
        let _ = writeln!(
            out,
            "arpg_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        out.push_str("# HELP arpg_batch_images Images per decoded batch.\n");
        out.push_str("# TYPE arpg_batch_images histogram\n");
        m.batches.write(&mut out, "arpg_batch_images", "", BATCH);
        out.push_str("# HELP arpg_images_total Images generated.\n");
        out.push_str("# TYPE arpg_images_total counter\n");
        let _ = writeln!(
            out,
            "arpg_images_total {}",
            self.images.load(Ordering::Relaxed)
        );
        let now = Instant::now();
        let last: usize = m.recent.iter().map(|r| r.1).sum();
        let span = m
            .recent
            .first()
            .map(|(t, _)| now.duration_since(*t).as_secs_f64())
            .unwrap_or(0.0)
            .max(1.0);
        out.push_str("# HELP arpg_images_per_second Images per second over the last minute.\n");
        out.push_str("# TYPE arpg_images_per_second gauge\n");
        let _ = writeln!(out, "arpg_images_per_second {}", last as f64 / span);
        let busy = self.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        out.push_str("# HELP arpg_busy_seconds_total Seconds the model spent decoding.\n");
        out.push_str("# TYPE arpg_busy_seconds_total counter\n");
        let _ = writeln!(out, "arpg_busy_seconds_total {busy}");
        out.push_str("# HELP arpg_panics_total Batches that panicked (the server kept running).\n");
        out.push_str("# TYPE arpg_panics_total counter\n");
        let _ = writeln!(
            out,
            "arpg_panics_total {}",
            self.panics.load(Ordering::Relaxed)
        );
        out
    }
}
