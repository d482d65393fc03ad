use arpg::model::{Mode, Positions};
use arpg::train::{TrainConfig, Trainer};
use candle_core::{DType, Device, Tensor};
fn main() -> anyhow::Result<()> {
    let cfg: arpg::ArpgConfig =
        serde_json::from_str(&std::fs::read_to_string("models/digits/config.json")?)?;
    let tc = TrainConfig {
        dropout: 0.0,
        ..Default::default()
    };
    let tr = Trainer::new(&cfg, &tc, DType::F32, &Device::Cpu)?;
    let (b, l) = (64usize, 64usize);
    let toks = Tensor::zeros((b, l), DType::U32, &Device::Cpu)?;
    let rows: Vec<u32> = (0..b).flat_map(|_| (0..l as u32).map(|i| i + 1)).collect();
    let pos = Tensor::from_vec(rows, (b, l), &Device::Cpu)?;
    for diff in [false, true] {
        let t = std::time::Instant::now();
        let model = tr.model()?;
        let t_build = t.elapsed();
        let t = std::time::Instant::now();
        let mut mode = Mode {
            differentiable: diff,
            dropout: None,
        };
        let logits = model.forward(
            &toks,
            Positions {
                keys: &pos,
                queries: &pos,
            },
            &mut mode,
        )?;
        let loss = logits.sqr()?.mean_all()?;
        let _ = loss.to_scalar::<f32>()?;
        let t_fwd = t.elapsed();
        let t = std::time::Instant::now();
        let _g = loss.backward()?;
        println!(
            "diff={diff} build {t_build:?} fwd {t_fwd:?} bwd {:?}",
            t.elapsed()
        );
    }
    Ok(())
}
