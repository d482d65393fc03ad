use candle_core::{DType, Device, Tensor, D};
fn t<F: FnMut() -> anyhow::Result<()>>(name: &str, mut f: F) -> anyhow::Result<()> {
    f()?;
    let s = std::time::Instant::now();
    for _ in 0..5 {
        f()?;
    }
    println!("{name}: {:?}", s.elapsed() / 5);
    Ok(())
}
fn main() -> anyhow::Result<()> {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (4096, 128), &d)?;
    let w = Tensor::randn(0f32, 1.0, (352, 128), &d)?;
    t("matmul 4096x128x352", || {
        let _ = x.matmul(&w.t()?)?;
        Ok(())
    })?;
    let q = Tensor::randn(0f32, 1.0, (64, 4, 64, 32), &d)?;
    t("attn scores", || {
        let _ = q.matmul(&q.t()?)?;
        Ok(())
    })?;
    let s = Tensor::randn(0f32, 1.0, (64, 4, 64, 64), &d)?;
    t("softmax composite", || {
        let _ = candle_nn::ops::softmax(&s, D::Minus1)?;
        Ok(())
    })?;
    t("softmax fused", || {
        let _ = candle_nn::ops::softmax_last_dim(&s)?;
        Ok(())
    })?;
    let h = Tensor::randn(0f32, 1.0, (64, 64, 128), &d)?;
    t("rms composite", || {
        let ms = h.sqr()?.mean_keepdim(D::Minus1)?;
        let _ = h.broadcast_div(&(ms + 1e-5)?.sqrt()?)?;
        Ok(())
    })?;
    t("transpose contiguous", || {
        let _ = q.transpose(1, 2)?.contiguous()?;
        Ok(())
    })?;
    let c = Tensor::randn(0f32, 1.0, (64, 64, 16), &d)?;
    t("rope composite", || {
        let _ = arpg::model::rope::apply(&q, &c, &c, true)?;
        Ok(())
    })?;
    t("rope fused", || {
        let _ = arpg::model::rope::apply(&q, &c, &c, false)?;
        Ok(())
    })?;
    let v = candle_core::Var::from_tensor(&x)?;
    t("matmul fwd+bwd", || {
        let y = v.as_tensor().matmul(&w.t()?)?;
        let _ = y.sum_all()?.backward()?;
        Ok(())
    })?;
    let _ = DType::F32;
    Ok(())
}
