//! A training run in a folder: the step loop with its log, periodic checkpoints and the final
//! inference weights, stopping cleanly on Ctrl-C (all ranks at the same step). What `arpg
//! train` runs; the command line only adds its progress bar.

use super::{StepStats, Trainer};
use crate::data::Packed;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Files of a training run in its folder.
pub const RUN_FILES: &[&str] = &["checkpoint.safetensors", "model.safetensors", "train.jsonl"];

/// Where and how often a run writes.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub out: PathBuf,
    /// Log every N steps (and the last).
    pub log_every: usize,
    /// Checkpoint every N steps (and at the end).
    pub ckpt_every: usize,
    /// Start the log over (`--overwrite`) instead of keeping the lines up to the resumed step.
    pub fresh_log: bool,
}

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.out.join("checkpoint.safetensors")
    }
    pub fn weights(&self) -> PathBuf {
        self.out.join("model.safetensors")
    }
    pub fn log(&self) -> PathBuf {
        self.out.join("train.jsonl")
    }
}

/// Train until step `until` (rank 0: writing `dir`; other ranks pass `None` and write
/// nothing, but take part in every checkpoint, every `ckpt_every` steps and at the end, which
/// ZeRO-1 gathers from all ranks). `on_step` sees every step and, on logged steps, the line
/// written to the log.
pub fn run(
    tr: &mut Trainer,
    data: &Packed,
    until: usize,
    dir: Option<&RunDir>,
    ckpt_every: usize,
    on_step: &mut dyn FnMut(&StepStats, Option<&serde_json::Value>),
) -> Result<()> {
    // The end of the run takes its own checkpoint.
    let ckpt_due = |step: usize| step.is_multiple_of(ckpt_every.max(1)) && step < until;
    let Some(dir) = dir else {
        while tr.step < until {
            if tr.any_rank(crate::util::interrupted())? {
                break;
            }
            let s = tr.train_step(data)?;
            if ckpt_due(s.step) {
                tr.checkpoint(None)?;
            }
        }
        return tr.checkpoint(None);
    };
    let (_, world) = tr.rank_and_world();
    crate::util::create_out(&dir.out)?;
    crate::util::write_atomic(
        &dir.out.join("config.json"),
        serde_json::to_string_pretty(&tr.model_cfg)?.as_bytes(),
    )?;
    let log_path = dir.log();
    if dir.fresh_log {
        crate::util::write_atomic(&log_path, b"")?;
    } else {
        // After a crash the log runs past the checkpoint (and may end in a cut line): keep
        // what the resumed run will not log again.
        trim_log(&log_path, tr.step)?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let batch = tr.cfg.batch_size;
    let ckpt = dir.checkpoint();
    let mut window = (std::time::Instant::now(), 0usize);
    while tr.step < until {
        if tr.any_rank(crate::util::interrupted())? {
            break;
        }
        let s = tr.train_step(data)?;
        window.1 += batch;
        let mut line = None;
        if s.step % dir.log_every == 0 || s.step == until {
            let ips = window.1 as f64 / window.0.elapsed().as_secs_f64();
            window = (std::time::Instant::now(), 0);
            let mut l = serde_json::json!({
                "step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
                "images_per_sec": ips, "epoch": (s.step * batch) as f64 / data.len() as f64,
                "processes": world,
            });
            if let Some(p) = s.phases_ms {
                l["phases_ms"] = serde_json::json!(p);
            }
            writeln!(log, "{l}")?;
            line = Some(l);
        }
        on_step(&s, line.as_ref());
        if ckpt_due(s.step) {
            tr.checkpoint(Some(&ckpt))?;
        }
    }
    // A second Ctrl-C now waits for both files instead of leaving neither.
    let busy = crate::util::Critical::enter();
    tr.checkpoint(Some(&ckpt))?;
    crate::checkpoint::save_safetensors_atomic(&tr.export_weights(), &dir.weights())?;
    drop(busy);
    Ok(())
}

/// Keep the log lines of steps up to `step` (those the resumed run does not log again),
/// dropping a last line cut by a crash; rewritten atomically, untouched when nothing goes.
pub fn trim_log(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0usize;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Option<serde_json::Value> = serde_json::from_str(line).ok();
        match v.as_ref().and_then(|v| v["step"].as_u64()) {
            Some(s) if s as usize <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        eprintln!(
            "{}: dropping {dropped} line(s) past the checkpoint's step {step} (they are trained again)",
            path.display()
        );
        crate::util::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}
