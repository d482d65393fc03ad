//! A real `arpg serve` process on an ephemeral loopback port.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub url: String,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// `arpg serve --model digits --port 0` plus `args`; waits for its address.
    pub fn start(args: &[&str]) -> Server {
        Self::start_model("digits", args)
    }

    /// [`Server::start`] with another built-in model.
    pub fn start_model(model: &str, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_arpg"))
            .args(["serve", "--model", model, "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start arpg serve");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        {
            let err = child.stderr.take().unwrap();
            let log = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(u) = line.strip_prefix("listening on ") {
                    let _ = tx.send(u.to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "arpg serve did not start: {}",
                    stderr.lock().unwrap().as_str()
                );
            }
        };
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        Server { child, url, stderr }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// SIGTERM, by the child's own pid.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Wait for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .no_proxy()
        .build()
        .unwrap()
}

/// The decoded pixels of each image of a JSON answer.
pub fn images(v: &serde_json::Value) -> Vec<(u64, Vec<u8>)> {
    use base64::Engine as _;
    v["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|im| {
            let png = base64::engine::general_purpose::STANDARD
                .decode(im["png"].as_str().unwrap())
                .unwrap();
            let img = image::load_from_memory(&png).unwrap().to_rgb8();
            (im["class"].as_u64().unwrap(), img.into_raw())
        })
        .collect()
}

/// A PNG of `w x h` pixels, base64.
pub fn png_b64(img: &image::RgbImage) -> String {
    use base64::Engine as _;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}
