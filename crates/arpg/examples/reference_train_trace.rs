//! Our training next to the paper's, step for step (issue: "the same training, not just a fast
//! one"). Trains a small reference-architecture model (no `abs_pos_embed`) on the UCI digits
//! with the autograd path, dropout 0, and writes what the paper's training step needs to
//! repeat the run exactly: the initial weights, every step's batch (class tokens after class
//! dropout, orders, targets) and learning rate, and our losses (`ours.jsonl`); then the same
//! run through the hand-written step (`hand.jsonl`).
//!
//! ```sh
//! cargo run --release -p arpg --example reference_train_trace -- OUT [STEPS] [BATCH]
//! python3 scripts/reference_train_compare.py --ref .bin/ref --trace OUT
//! ```

use anyhow::{Context, Result};
use arpg::data::{digits, PackWriter, Packed, Sample};
use arpg::train::{StepKind, TrainConfig, Trainer};
use arpg::ArpgConfig;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .context("usage: reference_train_trace OUT [STEPS] [BATCH]")?,
    );
    let steps: usize = args.next().map_or(Ok(200), |s| s.parse())?;
    let batch: usize = args.next().map_or(Ok(32), |s| s.parse())?;
    std::fs::create_dir_all(&out)?;
    let cfg = ArpgConfig {
        abs_pos_embed: false,
        ..arpg::zoo::digits_config()
    };
    let (train, _) = digits::split(&digits::load_csv_gz(std::path::Path::new(
        "data/digits/digits.csv.gz",
    ))?);
    let mut w = PackWriter::new();
    for d in &train {
        w.push(&Sample {
            label: d.label,
            crops: vec![d.pixels.iter().map(|&v| v as u16).collect()],
        })?;
    }
    let pack = out.join("digits.pack");
    w.write(&pack)?;
    let data = Packed::open(&pack)?;
    // Dropout 0: only arithmetic may differ. Class dropout stays (the batches carry it).
    let tc = TrainConfig {
        batch_size: batch,
        steps,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: steps / 10,
        dropout: 0.0,
        step_kind: StepKind::Autograd,
        ..Default::default()
    };
    let dev = Device::Cpu;
    let mut tr = Trainer::new(&cfg, &tc, DType::F32, &dev)?;
    // A twin with the same seed draws the same batches as `train_step` does, step by step.
    let mut twin = Trainer::new(&cfg, &tc, DType::F32, &dev)?;
    arpg::checkpoint::save_safetensors_atomic(&tr.export_weights(), &out.join("init.safetensors"))?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let mut trace: HashMap<String, Tensor> = HashMap::new();
    let mut log = std::fs::File::create(out.join("ours.jsonl"))?;
    for k in 0..steps {
        let idx = twin.batch_indices(k, batch, data.len());
        let b = twin.make_batch(&data, &idx)?;
        trace.insert(format!("tokens.{k}"), b.tokens.clone());
        trace.insert(format!("queries.{k}"), b.queries.clone());
        trace.insert(format!("targets.{k}"), b.targets.clone());
        let s = tr.train_step(&data)?;
        trace.insert(format!("lr.{k}"), Tensor::new(&[s.lr], &dev)?);
        writeln!(
            log,
            "{}",
            serde_json::json!({"step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm})
        )?;
    }
    arpg::checkpoint::save_safetensors_atomic(&trace, &out.join("batches.safetensors"))?;
    // The hand-written step from the same seed: the same initial weights and batches.
    let hand_cfg = TrainConfig {
        step_kind: StepKind::Hand,
        ..tc
    };
    let mut hand = Trainer::new(&cfg, &hand_cfg, DType::F32, &dev)?;
    let mut log = std::fs::File::create(out.join("hand.jsonl"))?;
    for _ in 0..steps {
        let s = hand.train_step(&data)?;
        writeln!(
            log,
            "{}",
            serde_json::json!({"step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm})
        )?;
    }
    eprintln!("{steps} steps of batch {batch}: trace in {}", out.display());
    Ok(())
}
