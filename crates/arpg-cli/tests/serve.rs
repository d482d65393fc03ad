//! `arpg serve` against a real server process on loopback with a real HTTP client.

mod common;

use common::{client, images, png_b64, Server};
use serde_json::{json, Value};
use std::time::Duration;

/// A request the digits model takes a while over on the CPU (64 images, 64 steps).
fn slow_body(seed: u64) -> Value {
    json!({"classes": [0,1,2,3,4,5,6,7], "per_class": 8, "steps": 64, "seed": seed})
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = client().post(url).json(body).send().await.unwrap();
    let s = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (s, v)
}

fn digit_image(v: u8) -> image::RgbImage {
    image::RgbImage::from_fn(8, 8, |x, _| {
        if (2..6).contains(&x) {
            image::Rgb([v, v, v])
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_answers() {
    let s = Server::start(&[]);
    let c = client();
    let h: Value = c
        .get(s.at("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    let m: Value = c
        .get(s.at("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let m = &m["models"][0];
    assert_eq!(m["id"], "digits");
    assert_eq!(m["config"]["vocab_size"], 17);
    assert_eq!(m["classes"].as_array().unwrap().len(), 10);
    assert_eq!(m["classes"][3], json!({"id": 3, "name": "3"}));
    let page = c.get(s.at("/")).send().await.unwrap();
    assert!(page
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("<title>arpg serve</title>"));

    // JSON generation: classes by id and by name.
    let (st, v) = post(
        &s.at("/v1/generate"),
        &json!({"classes": [3, "5"], "per_class": 2, "steps": 8, "seed": 1}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let ims = images(&v);
    assert_eq!(
        ims.iter().map(|i| i.0).collect::<Vec<_>>(),
        vec![3, 3, 5, 5]
    );
    assert!(ims.iter().all(|i| i.1.len() == 8 * 8 * 3));
    assert_eq!(v["images"][0]["width"], 8);

    // One image as PNG bytes.
    let r = c
        .post(s.at("/v1/generate"))
        .header("accept", "image/png")
        .json(&json!({"classes": [7], "steps": 8, "seed": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let png = r.bytes().await.unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 8);

    // Server-sent progress: every step, then the images, then done.
    let r = c
        .post(s.at("/v1/generate"))
        .json(&json!({"classes": [1], "per_class": 3, "steps": 8, "seed": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event:").map(str::trim))
        .collect();
    assert_eq!(events.iter().filter(|e| **e == "step").count(), 8, "{text}");
    assert_eq!(events.first(), Some(&"started"));
    assert_eq!(&events[events.len() - 2..], &["images", "done"]);
    assert!(text.contains(r#""step":8,"steps":8"#));

    // Inpainting: the right half regenerated.
    let img = digit_image(255);
    let mask = image::RgbImage::from_fn(8, 8, |x, _| {
        image::Rgb(if x >= 4 { [255; 3] } else { [0; 3] })
    });
    let (st, v) = post(
        &s.at("/v1/inpaint"),
        &json!({"image": png_b64(&img), "mask": format!("data:image/png;base64,{}", png_b64(&mask)),
                "class": 1, "samples": 2, "steps": 8, "seed": 4}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let ims = images(&v);
    assert_eq!(ims.len(), 2);
    // Outside the mask the pixels are the input's (the pixel tokenizer's 17 levels: exact
    // for 0 and 255).
    for (_, px) in &ims {
        for y in 0..8 {
            for x in 0..4 {
                let i = (y * 8 + x) * 3;
                assert_eq!(px[i], img.get_pixel(x as u32, y as u32)[0]);
            }
        }
    }

    // Outpainting: 8x8 -> 16x8.
    let (st, v) = post(
        &s.at("/v1/outpaint"),
        &json!({"image": png_b64(&img), "class": 1, "right": 8, "steps": 8, "seed": 5}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (
            v["images"][0]["width"].as_u64(),
            v["images"][0]["height"].as_u64()
        ),
        (Some(16), Some(8))
    );

    // Metrics count what happened.
    let text = c
        .get(s.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "arpg_requests_total{endpoint=\"/v1/generate\",status=\"200\"} 3",
        "arpg_requests_total{endpoint=\"/v1/inpaint\",status=\"200\"} 1",
        "arpg_queue_depth 0",
        "arpg_batch_images_count",
        "arpg_images_per_second",
        "arpg_request_duration_seconds_bucket{endpoint=\"/v1/generate\",le=\"+Inf\"} 3",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_seed_gives_the_images_of_arpg_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arpg"))
        .args([
            "sample",
            "--model",
            "digits",
            "--classes",
            "3,5",
            "--per-class",
            "10",
            "--steps",
            "8",
            "--seed",
            "7",
            "--cfg",
            "2.5",
            "--temperature",
            "0.9",
            "--top-k",
            "12",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = Server::start(&[]);
    let (st, v) = post(
        &s.at("/v1/generate"),
        &json!({"classes": [3, 5], "per_class": 10, "steps": 8, "seed": 7, "cfg": 2.5,
                "temperature": 0.9, "top_k": 12}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let ims = images(&v);
    assert_eq!(ims.len(), 20);
    for (i, (class, px)) in ims.iter().enumerate() {
        let p = dir.path().join(format!("{i:06}_class{class}.png"));
        let cli = image::open(&p).unwrap().to_rgb8().into_raw();
        assert_eq!(&cli, px, "image {i} differs from arpg sample's");
    }
}

/// A request's images do not depend on what it is batched with.
#[tokio::test(flavor = "multi_thread")]
async fn batched_requests_get_the_images_they_get_alone() {
    let s = Server::start(&["--batch-window-ms", "1000", "--max-batch", "64"]);
    let a = json!({"classes": [1, 2], "per_class": 2, "steps": 8, "seed": 11});
    let (st, alone) = post(&s.at("/v1/generate"), &a).await;
    assert_eq!(st, 200);
    let alone = images(&alone);
    // Again, together with others of the same settings (and one of other settings, which
    // must queue apart): A is sent between them so it sits in the middle of the batch.
    let mut tasks = Vec::new();
    for (i, body) in [
        json!({"classes": [5], "per_class": 3, "steps": 8, "seed": 1}),
        json!({"classes": [1, 2], "per_class": 2, "steps": 8, "seed": 11, "stream": true}),
        json!({"classes": [9, 1], "per_class": 2, "steps": 8, "seed": 12}),
        json!({"classes": [1, 2], "per_class": 2, "steps": 6, "seed": 11}),
    ]
    .into_iter()
    .enumerate()
    {
        let url = s.at("/v1/generate");
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
            let r = client().post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let sse = &answers[1];
    assert!(
        sse.contains(r#"{"batch":11}"#),
        "A was not batched with the two others of its settings:\n{sse}"
    );
    let data: String = sse
        .lines()
        .skip_while(|l| l.strip_prefix("event:").map(str::trim) != Some("images"))
        .nth(1)
        .unwrap()
        .strip_prefix("data:")
        .unwrap()
        .trim()
        .to_string();
    let batched = images(&serde_json::from_str(&data).unwrap());
    assert_eq!(batched, alone, "batching changed a request's images");
    let other_settings: Value = serde_json::from_str(&answers[3]).unwrap();
    assert_ne!(images(&other_settings), alone);
    let m = client()
        .get(s.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Batches: A alone (4), the three of one setting (11), the other setting (4).
    assert!(m.contains("arpg_batch_images_count 3"), "{m}");
    assert!(m.contains("arpg_batch_images_sum 19"), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_4xx_naming_the_field() {
    let s = Server::start(&["--max-body", "200000", "--max-images", "16"]);
    let c = client();
    let gen = s.at("/v1/generate");
    let img = png_b64(&digit_image(200));
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        ("/v1/generate", json!({"bogus": 1}), 422, Some("bogus")),
        ("/v1/generate", json!({"steps": "x"}), 422, Some("steps")),
        ("/v1/generate", json!({"steps": 0}), 422, Some("steps")),
        ("/v1/generate", json!({"steps": 65}), 422, Some("steps")),
        ("/v1/generate", json!({"cfg": -1}), 422, Some("cfg")),
        ("/v1/generate", json!({"top_p": 0}), 422, Some("top_p")),
        ("/v1/generate", json!({"top_k": 100}), 422, Some("top_k")),
        (
            "/v1/generate",
            json!({"temperature": -0.5}),
            422,
            Some("temperature"),
        ),
        (
            "/v1/generate",
            json!({"schedule": "linear"}),
            422,
            Some("schedule"),
        ),
        (
            "/v1/generate",
            json!({"cfg_schedule": "x"}),
            422,
            Some("cfg_schedule"),
        ),
        (
            "/v1/generate",
            json!({"classes": [3, 42]}),
            422,
            Some("classes[1]"),
        ),
        (
            "/v1/generate",
            json!({"classes": ["seven"]}),
            422,
            Some("classes[0]"),
        ),
        ("/v1/generate", json!({"classes": []}), 422, Some("classes")),
        (
            "/v1/generate",
            json!({"per_class": 0}),
            422,
            Some("per_class"),
        ),
        (
            "/v1/generate",
            json!({"per_class": 5}),
            422,
            Some("per_class"),
        ),
        ("/v1/generate", json!({"seed": -1}), 422, Some("seed")),
        ("/v1/generate", json!([1, 2]), 422, None),
        (
            "/v1/inpaint",
            json!({"image": img, "class": 1}),
            422,
            Some("mask"),
        ),
        (
            "/v1/inpaint",
            json!({"image": "%%%", "mask": img, "class": 1}),
            422,
            Some("image"),
        ),
        (
            "/v1/inpaint",
            json!({"image": img, "mask": png_b64(&image::RgbImage::new(4, 4)), "class": 1}),
            422,
            Some("mask"),
        ),
        (
            "/v1/inpaint",
            json!({"image": img, "mask": png_b64(&image::RgbImage::new(8, 8)), "class": 1}),
            422,
            Some("mask"),
        ),
        (
            "/v1/inpaint",
            json!({"image": img, "mask": img, "class": 10}),
            422,
            Some("class"),
        ),
        (
            "/v1/outpaint",
            json!({"image": img, "class": 1}),
            422,
            Some("right"),
        ),
        (
            "/v1/outpaint",
            json!({"image": img, "class": 1, "right": 64}),
            422,
            Some("right"),
        ),
        (
            "/v1/outpaint",
            json!({"image": img, "class": 1, "right": 8, "samples": 0}),
            422,
            Some("samples"),
        ),
    ];
    for (path, body, status, field) in cases {
        let (st, v) = post(&s.at(path), &body).await;
        assert_eq!(st, status, "{path} {body}: {v}");
        assert!(v["error"]["message"].is_string(), "{path} {body}: {v}");
        if let Some(f) = field {
            assert_eq!(v["error"]["field"], f, "{path} {body}: {v}");
        }
    }
    // Not JSON, empty, the wrong method, no such endpoint.
    for (req, status) in [
        (c.post(&gen).body("{\"steps\": 8,"), 400),
        (c.post(&gen).body("not json"), 400),
        (c.post(&gen), 400),
        (c.get(&gen), 405),
        (c.get(s.at("/v2/nothing")), 404),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // A body over the limit.
    let big = json!({"image": "A".repeat(300_000), "mask": "", "class": 1});
    let (st, v) = post(&s.at("/v1/inpaint"), &big).await;
    assert_eq!(st, 413, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("200000"));
    // A decompression bomb: a small PNG that claims 3000x3000 pixels.
    let bomb = png_b64(&image::RgbImage::new(3000, 3000));
    assert!(bomb.len() < 200_000, "{}", bomb.len());
    let (st, v) = post(
        &s.at("/v1/inpaint"),
        &json!({"image": bomb, "mask": img, "class": 1}),
    )
    .await;
    assert_eq!(st, 422, "{v}");
    assert_eq!(v["error"]["field"], "image");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("3000x3000"));
    // Still serving.
    let (st, _) = post(&gen, &json!({"classes": [1], "steps": 4})).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_key_is_required_everywhere_when_given() {
    let s = Server::start(&["--api-key", "sekrit"]);
    let c = client();
    let body = json!({"classes": [1], "steps": 4});
    for (method, path) in [
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("POST", "/v1/generate"),
        ("POST", "/v1/inpaint"),
        ("POST", "/v1/outpaint"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("sekrit"),
            Some("Basic sekrit"),
        ] {
            let mut r = c.request(method.parse().unwrap(), s.at(path)).json(&body);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} {auth:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["field"], "authorization");
        }
    }
    for path in ["/health", "/metrics", "/v1/models"] {
        let r = c
            .get(s.at(path))
            .bearer_auth("sekrit")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = c
        .post(s.at("/v1/generate"))
        .bearer_auth("sekrit")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The static page holds no data: it loads, and asks for the key.
    let r = c.get(s.at("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_503_with_retry_after() {
    let s = Server::start(&[
        "--max-queue",
        "1",
        "--batch-window-ms",
        "0",
        "--max-images",
        "256",
    ]);
    let url = s.at("/v1/generate");
    // 256 images at 64 steps: several seconds of work on any CPU.
    let mut slow = slow_body(1);
    slow["per_class"] = json!(32);
    let busy = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, &slow).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The worker decodes the slow request; this one takes the one queue slot...
    let queued = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, &json!({"classes": [1], "steps": 5})).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...and this one finds the queue full.
    let r = client()
        .post(&url)
        .json(&json!({"classes": [1], "steps": 6}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    assert_eq!(busy.await.unwrap().0, 200);
    assert_eq!(queued.await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_its_time_gets_504() {
    let s = Server::start(&["--request-timeout-s", "1", "--batch-window-ms", "0"]);
    // Two slow requests of different settings: the second waits for the first (queueing
    // counts), so it is over its second whatever the machine's speed.
    let url = s.at("/v1/generate");
    let first = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, &slow_body(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = slow_body(3);
    second["steps"] = json!(63);
    let (st, v) = post(&url, &second).await;
    assert_eq!(st, 504, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("longer than 1 s"));
    let _ = first.await.unwrap();
    // The cancelled jobs do not hold the server: the next request is served.
    let (st, _) = post(&url, &json!({"classes": [2], "steps": 4})).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_one_request_leaves_the_server_up() {
    let s = Server::start(&["--panic-on-seed", "666"]);
    let (st, v) = post(
        &s.at("/v1/generate"),
        &json!({"classes": [1], "steps": 4, "seed": 666}),
    )
    .await;
    assert_eq!(st, 500, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("panic"));
    let (st, v) = post(
        &s.at("/v1/generate"),
        &json!({"classes": [1], "steps": 4, "seed": 1}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let m = client()
        .get(s.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("arpg_panics_total 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_the_requests_in_flight_then_exits() {
    let mut s = Server::start(&[]);
    let mut body = slow_body(3);
    body["stream"] = json!(true);
    let mut r = client()
        .post(s.at("/v1/generate"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Wait until the request is being decoded, then SIGTERM.
    let mut text = String::new();
    while !text.contains("event: step") {
        let chunk = r.chunk().await.unwrap().expect("stream ended early");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    s.terminate();
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains("event: done") && text.contains(r#""count":64"#),
        "the request in flight was not finished: {}",
        &text[text.len().saturating_sub(300)..]
    );
    let status = s
        .wait_exit(Duration::from_secs(30))
        .expect("the server did not exit after SIGTERM");
    assert!(status.success(), "{status:?}: {}", s.stderr.lock().unwrap());
    // Nothing listens any more.
    assert!(client().get(s.at("/health")).send().await.is_err());
}

/// A control model behind the server: a posted condition gives `arpg sample --condition`'s
/// images, batched requests with different conditions each keep their own, and conditions
/// are refused where they do not apply.
#[tokio::test(flavor = "multi_thread")]
async fn a_posted_condition_steers_a_control_model_as_the_cli_does() {
    let dir = tempfile::tempdir().unwrap();
    // Two digit sketches: a vertical bar and a ring.
    let bar = image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb(
            [if (3..5).contains(&x) && (1..7).contains(&y) {
                255
            } else {
                0
            }; 3],
        )
    });
    let ring = image::RgbImage::from_fn(8, 8, |x, y| {
        let edge =
            (x == 2 || x == 5) && (1..7).contains(&y) || (y == 1 || y == 6) && (2..6).contains(&x);
        image::Rgb([if edge { 255 } else { 0 }; 3])
    });
    let bar_path = dir.path().join("bar.png");
    bar.save(&bar_path).unwrap();
    let out = dir.path().join("cli");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_arpg"))
        .args([
            "sample",
            "--model",
            "digits-sketch",
            "--classes",
            "1",
            "--per-class",
            "3",
        ])
        .args(["--steps", "16", "--seed", "4", "--condition"])
        .arg(&bar_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = Server::start_model("digits-sketch", &["--batch-window-ms", "300"]);
    let body = |img: &image::RgbImage, class: u32| json!({"classes": [class], "per_class": 3, "steps": 16, "seed": 4, "condition": png_b64(img)});
    // Sent together (one batch, by the window), each request keeps its own condition.
    let (url, bar_body, ring_body) = (s.at("/v1/generate"), body(&bar, 1), body(&ring, 0));
    let (a, b) = tokio::join!(post(&url, &bar_body), post(&url, &ring_body));
    assert_eq!((a.0, b.0), (200, 200), "{} {}", a.1, b.1);
    for (i, (_, px)) in images(&a.1).iter().enumerate() {
        let cli = image::open(out.join(format!("{i:06}_class1.png")))
            .unwrap()
            .to_rgb8()
            .into_raw();
        assert_eq!(&cli, px, "image {i} differs from arpg sample --condition's");
    }
    // The ring's samples draw the ring, not the bar: strokes (bright pixels) on its cells.
    let on_ring = |px: &[u8]| {
        let (mut hit, mut all) = (0, 0);
        for (i, &v) in px.iter().step_by(3).enumerate() {
            if v >= 128 {
                all += 1;
                hit += (ring.get_pixel((i % 8) as u32, (i / 8) as u32)[0] == 255) as usize;
            }
        }
        hit as f64 / all.max(1) as f64
    };
    for (_, px) in images(&b.1) {
        assert!(on_ring(&px) > 0.8, "{}", on_ring(&px));
    }
    // Refused with the field named.
    let (st, v) = post(
        &s.at("/v1/generate"),
        &json!({"classes": [1], "condition": "!!"}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (422, Some("condition")),
        "{v}"
    );
    let (st, v) = post(
        &s.at("/v1/generate"),
        &json!({"classes": [1], "condition": png_b64(&bar), "control_guidance": "both"}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (422, Some("control_guidance")),
        "{v}"
    );
    let (st, v) = post(
        &s.at("/v1/generate"),
        &json!({"classes": [1], "canny": true}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (422, Some("canny")),
        "{v}"
    );
    let (st, v) = client()
        .get(s.at("/v1/models"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    let v: Value = v.json().await.unwrap();
    assert_eq!(st, 200);
    assert_eq!(v["models"][0]["control"]["width"], 8, "{v}");
    let plain = Server::start(&[]);
    let (st, v) = post(
        &plain.at("/v1/generate"),
        &json!({"classes": [1], "condition": png_b64(&bar)}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (422, Some("condition")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no control encoder"),
        "{v}"
    );
}
