//! CUDA graphs for the decoding loop.
//!
//! The loop is launch-bound: a step of ARPG-L is about a thousand small kernels, each costing
//! more to launch from the host than to run. Every shape in a decode depends only on the batch
//! size and the schedule, so the whole loop (all steps, the guidance mix and the draws) is
//! captured once as one graph and replayed for every later batch of the same shape.

use super::{run_loop, Buffers, DeviceDraw, Inputs, Plan};
use crate::model::Arpg;
use anyhow::Result;
use candle_core::Tensor;

/// Captured decodes, kept across batches. Pass one to [`super::generate`] (or
/// [`super::sample_with`]) for every batch of a sampling run: the first decode of a shape (model,
/// batch size, schedule, guidance, temperature) runs eagerly and is captured; later ones upload
/// their inputs (classes, orders, a seed) and replay it with one launch. The tokens equal an
/// eager decode's with the same seed. On the CPU, with top-k / top-p (drawn on the host), or
/// when disabled, every decode runs eagerly.
pub struct DecodeGraphs {
    enabled: bool,
    entry: Option<Entry>,
    captures: usize,
    replays: usize,
}

struct Entry {
    plan: Plan,
    buf: Buffers,
    #[cfg(feature = "cuda")]
    graph: Option<candle_core::cuda_backend::cudarc::driver::CudaGraph>,
}

impl Default for DecodeGraphs {
    fn default() -> Self {
        Self::new(true)
    }
}

impl DecodeGraphs {
    /// `enabled = false` keeps the device buffers between batches but never captures.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            entry: None,
            captures: 0,
            replays: 0,
        }
    }

    /// Whether decodes may be captured (false after a failed capture).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Graphs captured so far (one per new shape).
    pub fn captures(&self) -> usize {
        self.captures
    }

    /// Decodes that replayed a captured graph.
    pub fn replays(&self) -> usize {
        self.replays
    }

    /// Run one decode (the device-draw loop); returns the drawn tokens `[b, n_unknown]` in
    /// generation order, on the device. A replay returns the graph's own buffer: read it
    /// before the next run. Non-finite logits are refused, however the decode ran (a capture
    /// only records, so the buffers then hold the eager run's values).
    pub(super) fn run(&mut self, model: &Arpg, plan: &Plan, inputs: &Inputs) -> Result<Tensor> {
        let drawn = self.decode(model, plan, inputs)?;
        let e = self.entry.as_ref().expect("set by decode");
        e.buf.check_finite(plan.counts.len())?;
        Ok(drawn)
    }

    fn decode(&mut self, model: &Arpg, plan: &Plan, inputs: &Inputs) -> Result<Tensor> {
        if self.entry.as_ref().map(|e| &e.plan) != Some(plan) {
            // Free the old graph and buffers before allocating new ones.
            self.entry = None;
            self.entry = Some(Entry {
                plan: plan.clone(),
                buf: Buffers::new(model, plan)?,
                #[cfg(feature = "cuda")]
                graph: None,
            });
        }
        let e = self.entry.as_mut().expect("set above");
        e.buf.load(model, inputs)?;
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = model.device() {
            if let Some(g) = &e.graph {
                g.launch()
                    .map_err(|err| anyhow::anyhow!("replaying the decode graph: {err:?}"))?;
                self.replays += 1;
                return Ok(e.buf.drawn.clone());
            }
            if self.enabled {
                {
                    // The eager run also fills candle's cache of kernel parameters, which a
                    // capture may not upload.
                    let _params = dev.enable_cuda_graph_htod_cache();
                    run_loop(model, plan, &mut e.buf, &mut DeviceDraw)?;
                }
                // A copy: the capture below records into the same buffers.
                let drawn = e.buf.drawn.copy()?;
                match capture(dev, model, plan, &mut e.buf) {
                    Ok(g) => {
                        e.graph = Some(g);
                        self.captures += 1;
                    }
                    Err(err) => {
                        tracing::warn!("CUDA graph capture failed; decoding eagerly: {err:#}");
                        self.enabled = false;
                    }
                }
                return Ok(drawn);
            }
        }
        run_loop(model, plan, &mut e.buf, &mut DeviceDraw)?;
        Ok(e.buf.drawn.clone())
    }
}

#[cfg(feature = "cuda")]
fn capture(
    dev: &candle_core::CudaDevice,
    model: &Arpg,
    plan: &Plan,
    buf: &mut Buffers,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaGraph> {
    use anyhow::Context;
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let _params = dev.enable_cuda_graph_htod_cache();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| anyhow::anyhow!("begin capture: {e:?}"))?;
    // Every temporary is dropped inside the loop, so the graph frees all it allocates.
    let ran = run_loop(model, plan, buf, &mut DeviceDraw);
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    ran.context("capturing the decoding loop")?;
    let graph = graph
        .map_err(|e| anyhow::anyhow!("end capture: {e:?}"))?
        .context("the capture recorded nothing")?;
    graph
        .upload()
        .map_err(|e| anyhow::anyhow!("uploading the graph: {e:?}"))?;
    Ok(graph)
}
