//! The FID InceptionV3: TensorFlow's 2015-12-05 Inception graph as ported by `pytorch-fid`
//! (weights `pt_inception-2015-12-05-6726825d.pth`, keys in torchvision's layout), with
//! pytorch-fid's FIDInceptionA/C/E_1/E_2 blocks (average pools that exclude the padding, a
//! max pool in the last block). Outputs the three feature sets of ADM's evaluator:
//! - `pool`: the 2048-d `pool_3` features (FID, precision/recall),
//! - `spatial`: the first 7 channels of `mixed_6/conv` (TF names; pytorch-fid's
//!   `Mixed_6d.branch1x1` after its ReLU), 17 x 17 x 7 flattened channels-last as ADM's
//!   NHWC reshape does (sFID),
//! - `logits`: `pool_3 @ fc.weight^T`, 1008 classes, without the bias, as ADM's IS takes
//!   `softmax/logits/MatMul`.
//!
//! BatchNorm (eval mode, eps 0.001) is folded into each convolution when loading.

use crate::checkpoint::{build_strict, StateDict};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Shape, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::HashMap;
use std::path::Path;

pub const POOL_DIM: usize = 2048;
pub const SPATIAL_DIM: usize = 7 * 17 * 17;
pub const LOGIT_DIM: usize = 1008;
/// The network's input side.
pub const SIDE: usize = 299;
const BN_EPS: f64 = 1e-3;

/// How uint8 images become the network's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocess {
    /// ADM's TensorFlow graph: bilinear resize to 299 with TF's legacy coordinates
    /// (`src = dst * in / out`), then `(x - 128) / 128`.
    Adm,
    /// pytorch-fid: `x / 255`, bilinear resize with half-pixel centres
    /// (`F.interpolate(align_corners=False)`), then `2x - 1`.
    PytorchFid,
}

impl std::str::FromStr for Preprocess {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adm" => Ok(Self::Adm),
            "pytorch-fid" => Ok(Self::PytorchFid),
            _ => bail!("unknown preprocessing {s:?} (expected adm or pytorch-fid)"),
        }
    }
}

/// Convolution + folded BatchNorm + ReLU (`BasicConv2d`).
struct Conv {
    w: Tensor,
    b: Tensor,
    stride: usize,
    pad: (usize, usize),
}

impl Conv {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Self> {
        let w = vb.pp("conv").get((cout, cin, k.0, k.1), "weight")?;
        let bn = vb.pp("bn");
        let gamma = bn.get(cout, "weight")?;
        let beta = bn.get(cout, "bias")?;
        let mean = bn.get(cout, "running_mean")?;
        let var = bn.get(cout, "running_var")?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let b = (beta - (mean * &scale)?)?;
        let w = w.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        Ok(Self {
            w,
            b: b.reshape((1, cout, 1, 1))?,
            stride,
            pad,
        })
    }
    fn sq(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        Self::new(vb, cin, cout, (k, k), stride, (pad, pad))
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // candle pads both sides equally; (1,7)/(7,1) kernels pad one axis only.
        let (x, p) = if self.pad.0 == self.pad.1 {
            (x.clone(), self.pad.0)
        } else {
            (
                x.pad_with_zeros(2, self.pad.0, self.pad.0)?
                    .pad_with_zeros(3, self.pad.1, self.pad.1)?,
                0,
            )
        };
        x.conv2d(&self.w, p, self.stride, 1, 1)?
            .broadcast_add(&self.b)?
            .relu()
    }
}

/// 3x3 average pool, stride 1, padding 1, not counting the padding (`count_include_pad=False`).
fn avg_pool_3x3_excl(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let valid = |i: usize, n: usize| 3 - (i == 0) as usize - (i + 1 == n) as usize;
    let counts: Vec<f32> = (0..h)
        .flat_map(|i| (0..w).map(move |j| (valid(i, h) * valid(j, w)) as f32))
        .collect();
    let counts = Tensor::from_vec(counts, (1, 1, h, w), x.device())?;
    let sum = (x
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .avg_pool2d_with_stride(3, 1)?
        * 9.0)?;
    Ok(sum.broadcast_div(&counts)?)
}

/// `InceptionA` (Mixed_5b/c/d).
struct BlockA {
    b1: Conv,
    b5_1: Conv,
    b5_2: Conv,
    b3_1: Conv,
    b3_2: Conv,
    b3_3: Conv,
    pool: Conv,
}

impl BlockA {
    fn new(vb: VarBuilder, cin: usize, pool_features: usize) -> Result<Self> {
        Ok(Self {
            b1: Conv::sq(vb.pp("branch1x1"), cin, 64, 1, 1, 0)?,
            b5_1: Conv::sq(vb.pp("branch5x5_1"), cin, 48, 1, 1, 0)?,
            b5_2: Conv::sq(vb.pp("branch5x5_2"), 48, 64, 5, 1, 2)?,
            b3_1: Conv::sq(vb.pp("branch3x3dbl_1"), cin, 64, 1, 1, 0)?,
            b3_2: Conv::sq(vb.pp("branch3x3dbl_2"), 64, 96, 3, 1, 1)?,
            b3_3: Conv::sq(vb.pp("branch3x3dbl_3"), 96, 96, 3, 1, 1)?,
            pool: Conv::sq(vb.pp("branch_pool"), cin, pool_features, 1, 1, 0)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1.forward(x)?;
        let b = self.b5_2.forward(&self.b5_1.forward(x)?)?;
        let c = self
            .b3_3
            .forward(&self.b3_2.forward(&self.b3_1.forward(x)?)?)?;
        let d = self.pool.forward(&avg_pool_3x3_excl(x)?)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

/// `InceptionB` (Mixed_6a): grid reduction 35 -> 17.
struct BlockB {
    b3: Conv,
    d1: Conv,
    d2: Conv,
    d3: Conv,
}

impl BlockB {
    fn new(vb: VarBuilder, cin: usize) -> Result<Self> {
        Ok(Self {
            b3: Conv::sq(vb.pp("branch3x3"), cin, 384, 3, 2, 0)?,
            d1: Conv::sq(vb.pp("branch3x3dbl_1"), cin, 64, 1, 1, 0)?,
            d2: Conv::sq(vb.pp("branch3x3dbl_2"), 64, 96, 3, 1, 1)?,
            d3: Conv::sq(vb.pp("branch3x3dbl_3"), 96, 96, 3, 2, 0)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b3.forward(x)?;
        let b = self.d3.forward(&self.d2.forward(&self.d1.forward(x)?)?)?;
        let c = x.max_pool2d_with_stride(3, 2)?;
        Ok(Tensor::cat(&[a, b, c], 1)?)
    }
}

/// `InceptionC` (Mixed_6b..e), 17 x 17 with factorised 7x7 convolutions.
struct BlockC {
    b1: Conv,
    b7: [Conv; 3],
    d7: [Conv; 5],
    pool: Conv,
}

impl BlockC {
    fn new(vb: VarBuilder, cin: usize, c7: usize) -> Result<Self> {
        let row = |name: &str, i, o| Conv::new(vb.pp(name), i, o, (1, 7), 1, (0, 3));
        let col = |name: &str, i, o| Conv::new(vb.pp(name), i, o, (7, 1), 1, (3, 0));
        Ok(Self {
            b1: Conv::sq(vb.pp("branch1x1"), cin, 192, 1, 1, 0)?,
            b7: [
                Conv::sq(vb.pp("branch7x7_1"), cin, c7, 1, 1, 0)?,
                row("branch7x7_2", c7, c7)?,
                col("branch7x7_3", c7, 192)?,
            ],
            d7: [
                Conv::sq(vb.pp("branch7x7dbl_1"), cin, c7, 1, 1, 0)?,
                col("branch7x7dbl_2", c7, c7)?,
                row("branch7x7dbl_3", c7, c7)?,
                col("branch7x7dbl_4", c7, c7)?,
                row("branch7x7dbl_5", c7, 192)?,
            ],
            pool: Conv::sq(vb.pp("branch_pool"), cin, 192, 1, 1, 0)?,
        })
    }
    /// The block's output and its 1x1 branch (ADM's `mixed_6/conv` for Mixed_6d).
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let a = self.b1.forward(x)?;
        let mut b = x.clone();
        for c in &self.b7 {
            b = c.forward(&b)?;
        }
        let mut d = x.clone();
        for c in &self.d7 {
            d = c.forward(&d)?;
        }
        let p = self.pool.forward(&avg_pool_3x3_excl(x)?)?;
        Ok((Tensor::cat(&[&a, &b, &d, &p], 1)?, a))
    }
}

/// `InceptionD` (Mixed_7a): grid reduction 17 -> 8.
struct BlockD {
    b3: [Conv; 2],
    b7: [Conv; 4],
}

impl BlockD {
    fn new(vb: VarBuilder, cin: usize) -> Result<Self> {
        Ok(Self {
            b3: [
                Conv::sq(vb.pp("branch3x3_1"), cin, 192, 1, 1, 0)?,
                Conv::sq(vb.pp("branch3x3_2"), 192, 320, 3, 2, 0)?,
            ],
            b7: [
                Conv::sq(vb.pp("branch7x7x3_1"), cin, 192, 1, 1, 0)?,
                Conv::new(vb.pp("branch7x7x3_2"), 192, 192, (1, 7), 1, (0, 3))?,
                Conv::new(vb.pp("branch7x7x3_3"), 192, 192, (7, 1), 1, (3, 0))?,
                Conv::sq(vb.pp("branch7x7x3_4"), 192, 192, 3, 2, 0)?,
            ],
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b3[1].forward(&self.b3[0].forward(x)?)?;
        let mut b = x.clone();
        for c in &self.b7 {
            b = c.forward(&b)?;
        }
        let p = x.max_pool2d_with_stride(3, 2)?;
        Ok(Tensor::cat(&[a, b, p], 1)?)
    }
}

/// `InceptionE` (Mixed_7b with an average pool excluding padding, Mixed_7c with a max pool:
/// pytorch-fid's FIDInceptionE_1 / E_2, following the TF graph).
struct BlockE {
    b1: Conv,
    b3_1: Conv,
    b3_2a: Conv,
    b3_2b: Conv,
    d1: Conv,
    d2: Conv,
    d3a: Conv,
    d3b: Conv,
    pool: Conv,
    max_pool: bool,
}

impl BlockE {
    fn new(vb: VarBuilder, cin: usize, max_pool: bool) -> Result<Self> {
        Ok(Self {
            b1: Conv::sq(vb.pp("branch1x1"), cin, 320, 1, 1, 0)?,
            b3_1: Conv::sq(vb.pp("branch3x3_1"), cin, 384, 1, 1, 0)?,
            b3_2a: Conv::new(vb.pp("branch3x3_2a"), 384, 384, (1, 3), 1, (0, 1))?,
            b3_2b: Conv::new(vb.pp("branch3x3_2b"), 384, 384, (3, 1), 1, (1, 0))?,
            d1: Conv::sq(vb.pp("branch3x3dbl_1"), cin, 448, 1, 1, 0)?,
            d2: Conv::sq(vb.pp("branch3x3dbl_2"), 448, 384, 3, 1, 1)?,
            d3a: Conv::new(vb.pp("branch3x3dbl_3a"), 384, 384, (1, 3), 1, (0, 1))?,
            d3b: Conv::new(vb.pp("branch3x3dbl_3b"), 384, 384, (3, 1), 1, (1, 0))?,
            pool: Conv::sq(vb.pp("branch_pool"), cin, 192, 1, 1, 0)?,
            max_pool,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1.forward(x)?;
        let b = self.b3_1.forward(x)?;
        let (b1, b2) = (self.b3_2a.forward(&b)?, self.b3_2b.forward(&b)?);
        let d = self.d2.forward(&self.d1.forward(x)?)?;
        let (d1, d2) = (self.d3a.forward(&d)?, self.d3b.forward(&d)?);
        let pooled = if self.max_pool {
            // The input is a ReLU output (>= 0), so zero padding equals -inf padding here.
            x.pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?
                .max_pool2d_with_stride(3, 1)?
        } else {
            avg_pool_3x3_excl(x)?
        };
        let p = self.pool.forward(&pooled)?;
        Ok(Tensor::cat(&[a, b1, b2, d1, d2, p], 1)?)
    }
}

/// The features of one batch of images.
pub struct Features {
    /// N x 2048.
    pub pool: Tensor,
    /// N x 2023 (17 x 17 x 7, channels last).
    pub spatial: Tensor,
    /// N x 1008.
    pub logits: Tensor,
}

pub struct InceptionV3 {
    stem: Vec<Conv>,
    mixed_5: [BlockA; 3],
    mixed_6a: BlockB,
    mixed_6: [BlockC; 4],
    mixed_7a: BlockD,
    mixed_7: [BlockE; 2],
    fc_t: Tensor,
    device: Device,
}

impl InceptionV3 {
    /// Build from pytorch-fid's key layout (torchvision's `Inception3`, no aux head).
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let stem = vec![
            Conv::sq(vb.pp("Conv2d_1a_3x3"), 3, 32, 3, 2, 0)?,
            Conv::sq(vb.pp("Conv2d_2a_3x3"), 32, 32, 3, 1, 0)?,
            Conv::sq(vb.pp("Conv2d_2b_3x3"), 32, 64, 3, 1, 1)?,
            Conv::sq(vb.pp("Conv2d_3b_1x1"), 64, 80, 1, 1, 0)?,
            Conv::sq(vb.pp("Conv2d_4a_3x3"), 80, 192, 3, 1, 0)?,
        ];
        let fc = vb.pp("fc").get((LOGIT_DIM, POOL_DIM), "weight")?;
        // The bias exists in the file; ADM's IS does not use it, but strict loading should
        // still account for it.
        let _ = vb.pp("fc").get(LOGIT_DIM, "bias")?;
        Ok(Self {
            stem,
            mixed_5: [
                BlockA::new(vb.pp("Mixed_5b"), 192, 32)?,
                BlockA::new(vb.pp("Mixed_5c"), 256, 64)?,
                BlockA::new(vb.pp("Mixed_5d"), 288, 64)?,
            ],
            mixed_6a: BlockB::new(vb.pp("Mixed_6a"), 288)?,
            mixed_6: [
                BlockC::new(vb.pp("Mixed_6b"), 768, 128)?,
                BlockC::new(vb.pp("Mixed_6c"), 768, 160)?,
                BlockC::new(vb.pp("Mixed_6d"), 768, 160)?,
                BlockC::new(vb.pp("Mixed_6e"), 768, 192)?,
            ],
            mixed_7a: BlockD::new(vb.pp("Mixed_7a"), 768)?,
            mixed_7: [
                BlockE::new(vb.pp("Mixed_7b"), 1280, false)?,
                BlockE::new(vb.pp("Mixed_7c"), 2048, true)?,
            ],
            fc_t: fc.t()?.contiguous()?,
            device: vb.device().clone(),
        })
    }

    /// Load pytorch-fid's weights: the `.pth` (legacy or zip PyTorch format) or a
    /// `.safetensors` conversion, with strict key and shape checks.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let sd = load_state_dict(path)?;
        build_strict(&sd, DType::F32, device, Self::new).with_context(|| {
            format!(
                "{} is not the FID InceptionV3 in pytorch-fid's layout (pt_inception-2015-12-05-6726825d.pth)",
                path.display()
            )
        })
    }

    /// Deterministic synthetic weights (see [`synthetic_value`]) for tests: the same numbers
    /// `scripts/fid_inception_fixture.py` puts into pytorch-fid's network.
    pub fn synthetic(device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_backend(Box::new(Synthetic), DType::F32, device.clone());
        Self::new(vb)
    }

    /// The synthetic weights as a state dict in pytorch-fid's key layout (every tensor the
    /// network asks for), e.g. to test loading from files.
    pub fn synthetic_state_dict() -> Result<HashMap<String, Tensor>> {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
        let backend = Recording(seen.clone());
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        Self::new(vb)?;
        let map = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        Ok(map)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Features of a preprocessed batch (N x 3 x 299 x 299, values in about [-1, 1]).
    pub fn forward(&self, x: &Tensor) -> Result<Features> {
        let mut x = x.clone();
        for (i, c) in self.stem.iter().enumerate() {
            x = c.forward(&x)?;
            // Max pools after Conv2d_2b_3x3 and Conv2d_4a_3x3.
            if i == 2 || i == 4 {
                x = x.max_pool2d_with_stride(3, 2)?;
            }
        }
        for b in &self.mixed_5 {
            x = b.forward(&x)?;
        }
        x = self.mixed_6a.forward(&x)?;
        let mut spatial = None;
        for (i, b) in self.mixed_6.iter().enumerate() {
            let (y, branch1x1) = b.forward(&x)?;
            if i == 2 {
                spatial = Some(branch1x1);
            }
            x = y;
        }
        x = self.mixed_7a.forward(&x)?;
        for b in &self.mixed_7 {
            x = b.forward(&x)?;
        }
        let pool = x.mean(D::Minus1)?.mean(D::Minus1)?;
        let logits = pool.matmul(&self.fc_t)?;
        let n = pool.dim(0)?;
        let spatial = spatial
            .context("Mixed_6d missing")?
            .narrow(1, 0, 7)?
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((n, SPATIAL_DIM))?;
        Ok(Features {
            pool,
            spatial,
            logits,
        })
    }

    /// Features of `n` uint8 RGB images (`h` x `w`, channels last, as in ADM's `.npz`).
    pub fn forward_images(
        &self,
        images: &[u8],
        n: usize,
        h: usize,
        w: usize,
        pre: Preprocess,
    ) -> Result<Features> {
        let x = preprocess(images, n, h, w, pre, &self.device)?;
        self.forward(&x)
    }
}

/// uint8 N x H x W x 3 -> f32 N x 3 x 299 x 299 network input.
pub fn preprocess(
    images: &[u8],
    n: usize,
    h: usize,
    w: usize,
    pre: Preprocess,
    device: &Device,
) -> Result<Tensor> {
    if images.len() != n * h * w * 3 || h == 0 || w == 0 {
        bail!("{} bytes are not {n} RGB images of {h} x {w}", images.len());
    }
    let x = Tensor::from_slice(images, (n, h, w, 3), device)?
        .to_dtype(DType::F32)?
        .permute((0, 3, 1, 2))?;
    let x = match pre {
        Preprocess::Adm => x,
        Preprocess::PytorchFid => (x / 255.0)?,
    };
    let x = if (h, w) == (SIDE, SIDE) {
        x.contiguous()?
    } else {
        let half = pre == Preprocess::PytorchFid;
        let rh = Tensor::from_vec(resize_matrix(h, SIDE, half), (SIDE, h), device)?;
        let rw = Tensor::from_vec(resize_matrix(w, SIDE, half), (SIDE, w), device)?;
        // out = Rh x Rw^T per channel plane.
        x.contiguous()?
            .broadcast_matmul(&rw.t()?)?
            .transpose(2, 3)?
            .broadcast_matmul(&rh.t()?)?
            .transpose(2, 3)?
            .contiguous()?
    };
    Ok(match pre {
        Preprocess::Adm => ((x - 128.0)? / 128.0)?,
        Preprocess::PytorchFid => ((x * 2.0)? - 1.0)?,
    })
}

/// Bilinear resampling from `inp` to `out` samples as a dense `out` x `inp` matrix; with
/// `half_pixel` PyTorch's `align_corners=False` coordinates, else TF's legacy ones.
pub fn resize_matrix(inp: usize, out: usize, half_pixel: bool) -> Vec<f32> {
    let scale = inp as f64 / out as f64;
    let mut m = vec![0f32; out * inp];
    for j in 0..out {
        let src = if half_pixel {
            ((j as f64 + 0.5) * scale - 0.5).max(0.0)
        } else {
            j as f64 * scale
        };
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let f = (src - i0 as f64) as f32;
        m[j * inp + i0] += 1.0 - f;
        m[j * inp + i1] += f;
    }
    m
}

/// Read pytorch-fid weights: legacy (pre-1.6, non-zip) PyTorch files, zip `.pth`, or
/// `.safetensors`. BatchNorm's `num_batches_tracked` counters are dropped (unused in eval).
pub fn load_state_dict(path: &Path) -> Result<StateDict> {
    let mut head = [0u8; 9];
    {
        use std::io::Read;
        let mut f = crate::util::open_regular(path, "Inception weights")?;
        let n = f
            .read(&mut head)
            .with_context(|| format!("cannot read Inception weights {}", path.display()))?;
        ensure!(n >= 2, "Inception weights {} are empty", path.display());
    }
    // A legacy pickle starts with PROTO 2 (0x80 0x02); a .safetensors file starts with its
    // header length (whose first byte may well be 0x80), then the JSON header's `{`.
    let legacy = head[0] == 0x80 && head[1] == 0x02 && head[8] != b'{';
    let mut sd = if legacy {
        StateDict {
            tensors: load_legacy_pth(path)
                .with_context(|| format!("cannot read legacy PyTorch file {}", path.display()))?,
            source: path.to_path_buf(),
        }
    } else {
        StateDict::load(path, crate::checkpoint::Weights::Model)?
    };
    sd.tensors
        .retain(|k, _| !k.ends_with("num_batches_tracked"));
    Ok(sd)
}

/// PyTorch's legacy serialisation: pickles of the magic number, protocol version and system
/// info, the object (tensors refer to storages by key), the list of storage keys, then each
/// storage as an i64 element count and its raw little-endian bytes.
fn load_legacy_pth(path: &Path) -> Result<HashMap<String, Tensor>> {
    use candle_core::pickle::{Object, Stack};
    let bytes = std::fs::read(path)?;
    // The magic number 0x1950a86a20f9469cfc6c is an 80-bit LONG1, which candle's unpickler
    // cannot hold: check its bytes here and start after it.
    const MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e";
    if !bytes.starts_with(MAGIC) {
        bail!("not a PyTorch file (no legacy magic number; zip .pth and .safetensors are also accepted)");
    }
    let mut cur = std::io::Cursor::new(&bytes[MAGIC.len()..]);
    let mut next = |what: &str| -> Result<Object> {
        crate::checkpoint::pickle_guard(&format!("pickle ({what})"), || {
            let mut s = Stack::empty();
            s.read_loop(&mut cur)
                .with_context(|| format!("corrupt pickle ({what})"))?;
            Ok(s.finalize()?)
        })
    };
    next("protocol version")?;
    next("system info")?;
    let obj = next("state dict")?;
    let keys = next("storage keys")?;
    let pos = MAGIC.len() + cur.position() as usize;
    let Object::Dict(entries) = obj else {
        bail!("the file does not hold a state dict at the top level");
    };
    let mut infos = Vec::new();
    for (name, value) in entries {
        let what = format!("tensor record {name:?}");
        let info = crate::checkpoint::pickle_guard(&what, || {
            Ok(value.into_tensor_info(name, Path::new(""))?)
        })?;
        if let Some(info) = info {
            infos.push(info);
        }
    }
    let keys: Vec<String> = match keys {
        Object::List(v) => v
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|o| anyhow::anyhow!("bad storage key {o:?}"))
            })
            .collect::<Result<_>>()?,
        other => bail!("bad storage key list {other:?}"),
    };
    // Element size of each storage, from the tensors that use it.
    let mut elsize: HashMap<String, usize> = HashMap::new();
    for t in &infos {
        elsize.insert(
            t.path.trim_start_matches('/').to_string(),
            t.dtype.size_in_bytes(),
        );
    }
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    let mut at = pos;
    for k in &keys {
        let count = bytes.get(at..at + 8).context("truncated storage header")?;
        let count = u64::from_le_bytes(count.try_into()?) as usize;
        let size = elsize.get(k).copied().unwrap_or(4);
        // A corrupt count must not overflow the offset arithmetic.
        let end = count
            .checked_mul(size)
            .and_then(|n| n.checked_add(at + 8))
            .with_context(|| format!("storage {k}: {count} elements do not fit in memory"))?;
        let data = bytes
            .get(at + 8..end)
            .with_context(|| format!("truncated storage {k}"))?;
        storages.insert(k.clone(), data);
        at = end;
    }
    let mut out = HashMap::new();
    for t in infos {
        let key = t.path.trim_start_matches('/');
        let data = storages
            .get(key)
            .with_context(|| format!("tensor {} refers to missing storage {key}", t.name))?;
        if !t.layout.is_contiguous() {
            bail!("tensor {} is not contiguous", t.name);
        }
        let start = t.layout.start_offset();
        let nbytes = t.layout.shape().elem_count() * t.dtype.size_in_bytes();
        let raw = data
            .get(start..start + nbytes)
            .with_context(|| format!("tensor {} runs past its storage", t.name))?;
        let tensor = Tensor::from_raw_buffer(raw, t.dtype, t.layout.dims(), &Device::Cpu)?;
        out.insert(t.name, tensor);
    }
    if out.is_empty() {
        bail!("no tensors found");
    }
    Ok(out)
}

/// FNV-1a, 32 bits: the per-tensor seed of the synthetic weights.
fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Element `j` of the synthetic tensor `name` with `shape`: a hash of (name, j) mapped to a
/// multiple of 0.001 in [-1, 1], scaled per kind of parameter so that activations keep a
/// sensible range through the 94 layers (He-uniform convolutions, BatchNorm near identity,
/// running variances in [0.5, 1.5]). Exactly reproducible in Python (integer hash, then one
/// f64 product rounded to f32).
pub fn synthetic_value(name: &str, shape: &[usize], j: usize) -> f32 {
    let mut h = (j as u32).wrapping_mul(2_654_435_761) ^ fnv1a(name);
    h ^= h >> 16;
    h = h.wrapping_mul(0x045d_9f3b);
    h ^= h >> 16;
    let u = (h % 2001) as f64 / 1000.0 - 1.0;
    let fan_in: usize = shape.iter().skip(1).product();
    let v = if name.ends_with("conv.weight") || name == "fc.weight" {
        u * (6.0 / fan_in as f64).sqrt()
    } else if name.ends_with("bn.weight") {
        1.0 + 0.2 * u
    } else if name.ends_with("running_var") {
        1.0 + 0.5 * u
    } else {
        // biases and running means
        0.1 * u
    };
    v as f32
}

/// A `VarBuilder` backend that makes every tensor from [`synthetic_value`].
struct Synthetic;

/// [`Synthetic`], keeping what it handed out.
struct Recording(std::sync::Arc<std::sync::Mutex<HashMap<String, Tensor>>>);

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = Synthetic.get(s, name, h, dtype, dev)?;
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .insert(name.to_string(), t.clone());
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Synthetic.get_unchecked(name, d, dev)
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

impl SimpleBackend for Synthetic {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let v: Vec<f32> = (0..s.elem_count())
            .map(|j| synthetic_value(name, &dims, j))
            .collect();
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("synthetic weights need a shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
