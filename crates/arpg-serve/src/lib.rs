//! `arpg serve`: an HTTP server for ARPG models on axum + tokio.
//!
//! Endpoints (JSON in and out, images as base64 PNG):
//! `POST /v1/generate`, `POST /v1/inpaint`, `POST /v1/outpaint` (add `"stream": true` or
//! `Accept: text/event-stream` for server-sent progress; `Accept: image/png` answers a single
//! image as PNG bytes), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text) and
//! the web page at `/`. One worker thread owns the model and batches compatible requests
//! ([`engine`]); handlers validate, queue and wait.

pub mod api;
pub mod engine;
pub mod load;
pub mod metrics;

use api::{ApiError, ClassNames, Limits, ModelShape};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use engine::{Engine, Event, Job, Queue, Refused, Work};
use metrics::Metrics;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The web page, shipped inside the binary.
const PAGE: &str = include_str!("page.html");

/// Server settings (the `arpg serve` flags).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model's name in `GET /v1/models`.
    pub model_name: String,
    /// Bearer token every endpoint but the static page requires, when set.
    pub api_key: Option<String>,
    /// Largest request body, bytes.
    pub max_body: usize,
    pub limits: Limits,
    /// Jobs waiting for the model before new ones get 503.
    pub max_queue: usize,
    /// How long the worker waits after the oldest queued job for compatible ones.
    pub batch_window: Duration,
    /// Most images decoded in one batch.
    pub max_batch: usize,
    /// Longest a request may take, queueing included (504 after).
    pub request_timeout: Duration,
    /// Test hook: requests with this seed panic inside the worker.
    pub panic_seed: Option<u64>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_name: "model".into(),
            api_key: None,
            max_body: 8 << 20,
            limits: Limits {
                max_images: 64,
                max_image_side: 2048,
                max_outpaint: 4,
            },
            max_queue: 256,
            batch_window: Duration::from_millis(10),
            max_batch: 64,
            request_timeout: Duration::from_secs(300),
            panic_seed: None,
        }
    }
}

impl ServeConfig {
    /// What the command line's values mean: a limit of 0 reads as 1 (0 would refuse every
    /// request), an empty API key as none.
    pub fn normalized(mut self) -> Self {
        let l = &mut self.limits;
        l.max_images = l.max_images.max(1);
        l.max_image_side = l.max_image_side.max(1);
        self.max_queue = self.max_queue.max(1);
        self.max_batch = self.max_batch.max(1);
        self.request_timeout = self.request_timeout.max(Duration::from_secs(1));
        self.api_key = self.api_key.filter(|k| !k.is_empty());
        self
    }
}

/// A bearer token: `given`, else the `ARPG_API_KEY` environment variable.
pub fn api_key_or_env(given: Option<String>) -> Option<String> {
    given.or_else(|| std::env::var("ARPG_API_KEY").ok())
}

/// Serving beyond this machine must be asked for (`--allow-remote`).
pub fn check_host(host: std::net::IpAddr, allow_remote: bool) -> anyhow::Result<()> {
    if !host.is_loopback() && !allow_remote {
        anyhow::bail!(
            "--host {host} is not a loopback address: add --allow-remote (and --api-key) to serve beyond this machine"
        );
    }
    Ok(())
}

struct App {
    cfg: ServeConfig,
    engine: Arc<Engine>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    names: ClassNames,
    shape: ModelShape,
    next_id: AtomicU64,
}

/// `arpg serve`: listen on `addr`, print it (`listening on http://...`, the line scripts
/// wait for), and serve on a runtime of its own until SIGTERM or Ctrl-C.
pub fn run_blocking(
    addr: std::net::SocketAddr,
    engine: Engine,
    cfg: ServeConfig,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {}:{}", addr.ip(), addr.port()))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        eprintln!("arpg serve: model {} on http://{addr}/ (SIGTERM or Ctrl-C stops it after the requests in flight)", cfg.model_name);
        serve(listener, engine, cfg, stop_signal()).await
    })
}

/// SIGTERM, or the Ctrl-C flag ([`arpg::util::interrupted`]) that the binary's handler sets.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    loop {
        match term.as_mut() {
            Some(t) => tokio::select! {
                _ = t.recv() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            },
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        if arpg::util::interrupted() {
            return;
        }
    }
}

/// Serve on `listener` until `shutdown` resolves, then stop taking requests, finish those in
/// flight and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Engine,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let queue = Arc::new(Queue::new(
        cfg.max_queue,
        cfg.batch_window,
        cfg.max_batch.max(1),
        metrics.clone(),
    ));
    let mc = engine.model.config().clone();
    let shape = ModelShape {
        grid: mc.grid_size(),
        patch: engine.tokenizer.patch_size(),
        vocab: mc.vocab_size,
        num_classes: mc.num_classes,
        control: arpg::sampler::DecodeShape::of_config(&mc).control,
    };
    let engine = Arc::new(engine);
    let worker = {
        let (e, q, m) = (engine.clone(), queue.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("arpg-model".into())
            .spawn(move || engine::work(e, q, m))?
    };
    let app = Arc::new(App {
        names: ClassNames::for_classes(mc.num_classes),
        shape,
        cfg,
        engine,
        queue: queue.clone(),
        metrics,
        next_id: AtomicU64::new(0),
    });
    let router = router(app.clone());
    let q = queue.clone();
    let res = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing the requests in flight");
            q.close();
        })
        .await;
    queue.close();
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    res?;
    Ok(())
}

fn router(app: Arc<App>) -> Router {
    let max_body = app.cfg.max_body;
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/generate", post(generate))
        .route("/v1/inpaint", post(inpaint))
        .route("/v1/outpaint", post(outpaint))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    None,
                    "internal error (panic)",
                )
                .into_response()
            },
        ))
        .with_state(app)
}

/// Requests by endpoint and status, latency; every 4xx/5xx that is not JSON yet becomes
/// the JSON error shape (axum's own 404 / 405 / 413 answers).
async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let t = Instant::now();
    let path = req.uri().path().to_string();
    let endpoint = match path.as_str() {
        "/" | "/health" | "/metrics" | "/v1/models" | "/v1/generate" | "/v1/inpaint"
        | "/v1/outpaint" => path.as_str(),
        _ => "other",
    }
    .to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    let resp = if (status.is_client_error() || status.is_server_error())
        && !resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
    {
        let msg = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                format!("the request body is larger than {} bytes", app.cfg.max_body)
            }
            StatusCode::NOT_FOUND => format!("no endpoint {path}"),
            StatusCode::METHOD_NOT_ALLOWED => format!("method not allowed on {path}"),
            s => s.canonical_reason().unwrap_or("error").to_string(),
        };
        let mut e = ApiError::new(status, None, msg).into_response();
        for h in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
            if let Some(v) = resp.headers().get(&h) {
                e.headers_mut().insert(h, v.clone());
            }
        }
        e
    } else {
        resp
    };
    app.metrics
        .observe_request(&endpoint, resp.status().as_u16(), t.elapsed());
    resp
}

/// Bearer-token check for every endpoint but the static page (which holds no data and asks
/// for the key itself).
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.cfg.api_key {
        if req.uri().path() != "/" {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()));
            if !ok {
                let mut r = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    Some("authorization"),
                    "missing or wrong API key: send `Authorization: Bearer <key>`",
                )
                .into_response();
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "model": app.cfg.model_name,
        "queue_depth": app.queue.len(),
    }))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let mc = app.engine.model.config();
    let classes: Vec<_> = app
        .names
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| serde_json::json!({"id": i, "name": n}))
        .collect();
    let s = &app.shape;
    Json(serde_json::json!({
        "models": [{
            "id": app.cfg.model_name,
            "config": mc,
            "tokenizer": match app.engine.tokenizer {
                arpg::tokenizer::ImageTokenizer::Pixel => "pixel",
                arpg::tokenizer::ImageTokenizer::Vq(_) => "vq",
            },
            "image_size": s.grid * s.patch,
            "control": s.control.map(|((c, h, w), dropout)| serde_json::json!({
                "channels": c, "height": h, "width": w, "condition_optional": dropout})),
            "patch_size": s.patch,
            "grid": s.grid,
            "classes": classes,
            "defaults": {"steps": 64.min(s.grid * s.grid), "cfg": 4.0, "cfg_schedule": "linear",
                         "schedule": "arccos", "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                         "seed": 0, "per_class": 1},
            "limits": {"max_images": app.cfg.limits.max_images,
                       "max_image_side": app.cfg.limits.max_image_side,
                       "max_body_bytes": app.cfg.max_body,
                       "max_batch": app.cfg.max_batch,
                       "max_queue": app.cfg.max_queue,
                       "request_timeout_s": app.cfg.request_timeout.as_secs_f64()},
        }]
    }))
}

fn accepts(h: &HeaderMap, what: &str) -> bool {
    h.get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(what)))
}

async fn generate(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let r: api::GenerateReq = match api::parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let cond = api::condition(
        r.condition.as_deref(),
        r.canny,
        r.control_guidance.as_deref(),
        &app.shape,
        &app.cfg.limits,
    );
    let cond = match cond {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match api::generate_work(&r, &app.names, &app.shape, &app.cfg.limits) {
        Ok((work, sc, seed)) => answer(app, &headers, work, sc, seed, cond, r.stream).await,
        Err(e) => e.into_response(),
    }
}

/// The tokens of an image already resized to the model's size, on a blocking thread.
async fn encode_image(app: &Arc<App>, img: image::RgbImage) -> anyhow::Result<Vec<u32>> {
    let e = app.engine.clone();
    tokio::task::spawn_blocking(move || {
        Ok(e.tokenizer
            .encode(std::slice::from_ref(&img), &e.device)?
            .remove(0))
    })
    .await?
}

async fn inpaint(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let r: api::InpaintReq = match api::parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let cond = api::condition(
        r.condition.as_deref(),
        r.canny,
        r.control_guidance.as_deref(),
        &app.shape,
        &app.cfg.limits,
    );
    let cond = match cond {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // Validate and resize first; encoding (a VQ forward) runs off the async threads.
    let mut resized = None;
    let res = api::inpaint_work(&r, &app.names, &app.shape, &app.cfg.limits, |img| {
        resized = Some(img.clone());
        Ok(vec![0; app.shape.grid * app.shape.grid])
    });
    let (mut work, sc, seed) = match res {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let tokens = match encode_image(&app, resized.expect("resized")).await {
        Ok(t) => t,
        Err(e) => return ApiError::bad("image", format!("{e:#}")).into_response(),
    };
    if let Work::Inpaint { known, .. } = &mut work {
        for k in known.iter_mut() {
            k.1 = tokens[k.0];
        }
    }
    answer(app, &headers, work, sc, seed, cond, r.stream).await
}

async fn outpaint(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let r: api::OutpaintReq = match api::parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut resized = None;
    let res = api::outpaint_work(&r, &app.names, &app.shape, &app.cfg.limits, |img| {
        resized = Some(img.clone());
        Ok(vec![0; app.shape.grid * app.shape.grid])
    });
    let (mut work, sc, seed) = match res {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let tokens = match encode_image(&app, resized.expect("resized")).await {
        Ok(t) => t,
        Err(e) => return ApiError::bad("image", format!("{e:#}")).into_response(),
    };
    if let Work::Outpaint { canvas, .. } = &mut work {
        let g = app.shape.grid;
        let (top, left) = (0..canvas.rows * canvas.cols)
            .find(|&i| canvas.cells[i].is_some())
            .map(|i| (i / canvas.cols, i % canvas.cols))
            .unwrap_or((0, 0));
        for (i, &t) in tokens.iter().enumerate() {
            canvas.cells[(top + i / g) * canvas.cols + left + i % g] = Some(t);
        }
    }
    if app.shape.control.is_some_and(|c| !c.1) {
        return ApiError::bad(
            "image",
            "outpainting takes no condition, and this control model needs one",
        )
        .into_response();
    }
    answer(app, &headers, work, sc, seed, None, r.stream).await
}

fn png_bytes(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("PNG encoding into memory");
    out
}

use image::ImageEncoder as _;

fn images_json(app: &App, ims: &[(usize, image::RgbImage)]) -> Vec<serde_json::Value> {
    ims.iter()
        .map(|(c, im)| {
            serde_json::json!({
                "class": c,
                "name": app.names.names.get(*c),
                "width": im.width(),
                "height": im.height(),
                "png": base64::engine::general_purpose::STANDARD.encode(png_bytes(im)),
            })
        })
        .collect()
}

/// Queue a job and answer: JSON with every image, PNG bytes, or server-sent events.
async fn answer(
    app: Arc<App>,
    headers: &HeaderMap,
    work: Work,
    sc: arpg::sampler::SampleConfig,
    seed: u64,
    condition: Option<(candle_core::Tensor, bool)>,
    stream: Option<bool>,
) -> Response {
    let t = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let steps = sc.steps;
    let mut job = Job::new(id, work, sc, seed, tx, cancel.clone());
    job.condition = condition;
    job.panic = app.cfg.panic_seed == Some(seed);
    match app.queue.submit(job) {
        Ok(()) => {}
        Err(Refused::Full) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                format!(
                    "the queue is full ({} requests waiting): retry later",
                    app.cfg.max_queue
                ),
            );
            e.retry_after = Some(1);
            return e.into_response();
        }
        Err(Refused::ShuttingDown) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the server is shutting down",
            );
            e.retry_after = Some(5);
            return e.into_response();
        }
    }
    let deadline = tokio::time::Instant::now() + app.cfg.request_timeout;
    let timeout_msg = format!(
        "the request took longer than {} s",
        app.cfg.request_timeout.as_secs_f64()
    );
    if stream.unwrap_or(false) || accepts(headers, "text/event-stream") {
        // Cancel the job when the client goes away (the stream is dropped).
        struct Guard(Arc<AtomicBool>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let guard = Guard(cancel);
        let app2 = app.clone();
        let s = futures_util::stream::unfold(
            (rx, false, 0usize, guard),
            move |(mut rx, finished, count, guard)| {
                let app = app2.clone();
                let timeout_msg = timeout_msg.clone();
                async move {
                    if finished {
                        return None;
                    }
                    let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Err(_) => {
                            guard.0.store(true, Ordering::Relaxed);
                            let e = ApiError::new(StatusCode::GATEWAY_TIMEOUT, None, timeout_msg);
                            return Some((
                                Ok::<_, Infallible>(
                                    SseEvent::default()
                                        .event("error")
                                        .data(e.body().to_string()),
                                ),
                                (rx, true, count, guard),
                            ));
                        }
                        Ok(None) => return None,
                        Ok(Some(ev)) => ev,
                    };
                    let (sse, done, count) = match ev {
                        Event::Started { batch } => (
                            SseEvent::default()
                                .event("started")
                                .data(serde_json::json!({"batch": batch}).to_string()),
                            false,
                            count,
                        ),
                        Event::Step {
                            step,
                            steps,
                            chunk,
                            chunks,
                        } => (
                            SseEvent::default().event("step").data(
                                serde_json::json!({"step": step, "steps": steps, "chunk": chunk, "chunks": chunks})
                                    .to_string(),
                            ),
                            false,
                            count,
                        ),
                        Event::Images(ims) => (
                            SseEvent::default().event("images").data(
                                serde_json::json!({"images": images_json(&app, &ims)}).to_string(),
                            ),
                            false,
                            count + ims.len(),
                        ),
                        Event::Done => (
                            SseEvent::default().event("done").data(
                                serde_json::json!({"count": count, "seed": seed,
                                    "elapsed_ms": t.elapsed().as_millis() as u64})
                                .to_string(),
                            ),
                            true,
                            count,
                        ),
                        Event::Failed(m) => (
                            SseEvent::default().event("error").data(
                                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, m)
                                    .body()
                                    .to_string(),
                            ),
                            true,
                            count,
                        ),
                    };
                    Some((Ok(sse), (rx, done, count, guard)))
                }
            },
        );
        return Sse::new(s).keep_alive(KeepAlive::default()).into_response();
    }
    let mut images = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => {
                cancel.store(true, Ordering::Relaxed);
                return ApiError::new(StatusCode::GATEWAY_TIMEOUT, None, timeout_msg)
                    .into_response();
            }
            Ok(None) => {
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    None,
                    "the worker stopped",
                )
                .into_response()
            }
            Ok(Some(Event::Images(ims))) => images.extend(ims),
            Ok(Some(Event::Done)) => break,
            Ok(Some(Event::Failed(m))) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, m).into_response()
            }
            Ok(Some(_)) => {}
        }
    }
    if images.len() == 1 && accepts(headers, "image/png") && !accepts(headers, "application/json") {
        return (
            [(header::CONTENT_TYPE, "image/png")],
            png_bytes(&images[0].1),
        )
            .into_response();
    }
    Json(serde_json::json!({
        "images": images_json(&app, &images),
        "seed": seed,
        "steps": steps,
        "elapsed_ms": t.elapsed().as_millis() as u64,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limits_read_as_one_and_remote_hosts_are_asked_for() {
        let c = ServeConfig {
            max_queue: 0,
            max_batch: 0,
            request_timeout: Duration::ZERO,
            api_key: Some(String::new()),
            limits: Limits {
                max_images: 0,
                max_image_side: 0,
                max_outpaint: 4,
            },
            ..Default::default()
        }
        .normalized();
        assert_eq!((c.max_queue, c.max_batch), (1, 1));
        assert_eq!((c.limits.max_images, c.limits.max_image_side), (1, 1));
        assert_eq!(c.request_timeout, Duration::from_secs(1));
        assert_eq!(c.api_key, None);
        assert!(check_host("127.0.0.1".parse().unwrap(), false).is_ok());
        let e = check_host("10.0.0.1".parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("--allow-remote"));
        assert!(check_host("10.0.0.1".parse().unwrap(), true).is_ok());
    }
}
