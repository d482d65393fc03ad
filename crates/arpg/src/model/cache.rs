//! Preallocated key/value caches, written in place (the reference grows them by concatenation).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// Per self-attention layer K/V plus the shared K/V that pass 2 attends to, each one buffer
/// `[2, batch, heads, capacity, head_dim]` (keys, then values: what the fused decoding step
/// reads and writes as one).
pub struct KvCache {
    layers: Vec<Tensor>,
    shared: Tensor,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        batch: usize,
        heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (2, batch, heads, capacity, head_dim);
        let buf = || Tensor::zeros(shape, dtype, device);
        Ok(Self {
            layers: (0..n_layers).map(|_| buf()).collect::<Result<_, _>>()?,
            shared: buf()?,
            len: 0,
            capacity,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forget the contents (the buffers are reused).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Self-attention layer `i`'s buffer, `[2, b, h, capacity, d]`.
    pub fn layer(&self, i: usize) -> &Tensor {
        &self.layers[i]
    }
    /// The shared keys/values' buffer.
    pub fn shared(&self) -> &Tensor {
        &self.shared
    }

    fn write(buf: &Tensor, at: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = k.dim(2)?;
        let (kb, vb) = (buf.get(0)?, buf.get(1)?);
        kb.slice_set(&k.contiguous()?, 2, at)?;
        vb.slice_set(&v.contiguous()?, 2, at)?;
        Ok((kb.narrow(2, 0, at + m)?, vb.narrow(2, 0, at + m)?))
    }

    /// Write layer `i`'s new keys/values after the cached ones; returns all of them.
    pub fn append_layer(&self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Self::write(&self.layers[i], self.len, k, v)
    }

    pub fn append_shared(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Self::write(&self.shared, self.len, k, v)
    }

    /// Commit `m` tokens written by the append calls of this step.
    pub fn advance(&mut self, m: usize) {
        self.len += m;
    }
}
