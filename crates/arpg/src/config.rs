//! Model and tokenizer configurations, with the paper's presets.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// ARPG transformer configuration. Field names are the reference `ModelArgs` keys, so a
/// `--config FILE.json` written for the reference (or the fixtures' `arpg_config`) loads as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArpgConfig {
    pub dim: usize,
    /// Total layers: `n_layer / 2` self-attention plus `n_layer / 2` cross-attention blocks.
    pub n_layer: usize,
    pub n_head: usize,
    pub vocab_size: usize,
    pub num_classes: usize,
    /// Number of image tokens (a square grid).
    pub block_size: usize,
    #[serde(default = "default_multiple_of")]
    pub multiple_of: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_rope_base")]
    pub rope_base: f64,
    #[serde(default)]
    pub ffn_dim_multiplier: Option<f64>,
    #[serde(default = "default_cls_token_num")]
    pub cls_token_num: usize,
    /// A learned absolute position embedding (`pos_embeddings.weight`, one row per RoPE row)
    /// added to the content tokens and to the mask queries. Off (the reference, and the
    /// official checkpoints), positions enter only through RoPE, i.e. only as offsets between
    /// tokens: no prediction can depend on where its cell is on the grid (the first query,
    /// with only the class token to attend to, predicts the same at every cell).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abs_pos_embed: bool,
    /// A control encoder (controllable generation): a condition image becomes one query
    /// embedding per grid cell. Absent in the official checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlConfig>,
}

/// How a condition image steers the queries of pass 2 (see `model::control`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Channels of the condition image: 1 (edges, depth, masks, sketches) or 3 (RGB).
    pub channels: usize,
    /// Condition pixels per grid cell side: the tokenizer's downsampling (16 for VQ-16,
    /// 1 for the digits' pixel tokens). The condition image is `grid * patch` square.
    pub patch: usize,
    /// Bidirectional transformer layers after the patch embedding.
    #[serde(default)]
    pub layers: usize,
    /// `add`: the query of cell p is the mask token plus p's control embedding (starts as the
    /// class-only model: the output projection is zero at initialisation); `replace`: the
    /// control embedding alone (plus the position embedding) in place of the mask token.
    #[serde(default)]
    pub query: ControlQuery,
    /// The condition dropout the model was trained with. Above 0 the model has learned the
    /// null condition, so it can sample without a condition and guide over it (CFG over the
    /// class and the control together); at 0 a condition is required.
    #[serde(default)]
    pub dropout: f64,
}

impl ControlConfig {
    /// The block's own checks, for a model of `grid` x `grid` tokens.
    pub fn validate(&self, grid: usize) -> Result<()> {
        if self.channels != 1 && self.channels != 3 {
            bail!("control.channels ({}) must be 1 or 3", self.channels);
        }
        let side = grid.saturating_mul(self.patch);
        if self.patch == 0 || side > 1 << 14 {
            bail!(
                "control.patch ({}) must be positive, with a condition image (grid x patch) \
                 of at most 16384 pixels a side",
                self.patch
            );
        }
        if self.layers > 64 {
            bail!("control.layers ({}) is over the limit of 64", self.layers);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("control.dropout ({}) must be in [0, 1)", self.dropout);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlQuery {
    #[default]
    Add,
    Replace,
}

impl std::str::FromStr for ControlQuery {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "add" => Ok(Self::Add),
            "replace" => Ok(Self::Replace),
            _ => bail!("unknown control query {s:?} (expected add or replace)"),
        }
    }
}

fn default_multiple_of() -> usize {
    256
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_rope_base() -> f64 {
    10000.0
}
fn default_cls_token_num() -> usize {
    1
}

/// Largest config file read (they are a few hundred bytes).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The official presets: name, (dim, n_layer, n_head), Hugging Face file.
pub const PRESETS: &[(&str, usize, usize, usize, &str)] = &[
    ("ARPG-L", 1024, 24, 16, "arpg_300m.pt"),
    ("ARPG-XL", 1280, 36, 20, "arpg_700m.pt"),
    ("ARPG-XXL", 1536, 48, 24, "arpg_1b.pt"),
];

impl ArpgConfig {
    /// ImageNet 256x256 model with the reference defaults.
    pub fn imagenet(dim: usize, n_layer: usize, n_head: usize) -> Self {
        Self {
            dim,
            n_layer,
            n_head,
            vocab_size: 16384,
            num_classes: 1000,
            block_size: 256,
            multiple_of: 256,
            norm_eps: 1e-5,
            rope_base: 10000.0,
            ffn_dim_multiplier: None,
            cls_token_num: 1,
            abs_pos_embed: false,
            control: None,
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        PRESETS
            .iter()
            .find(|p| p.0.eq_ignore_ascii_case(name))
            .map(|p| Self::imagenet(p.1, p.2, p.3))
            .with_context(|| {
                let names: Vec<_> = PRESETS.iter().map(|p| p.0).collect();
                format!(
                    "unknown model preset {name:?}; known presets: {}",
                    names.join(", ")
                )
            })
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = crate::util::read_small(path, MAX_CONFIG_BYTES, "model config")?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("invalid model config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("invalid model config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || self.n_head == 0 || !self.dim.is_multiple_of(self.n_head) {
            bail!(
                "dim ({}) must be a positive multiple of n_head ({})",
                self.dim,
                self.n_head
            );
        }
        if !self.head_dim().is_multiple_of(4) {
            bail!(
                "head_dim = dim / n_head = {} must be a multiple of 4 for 2D RoPE",
                self.head_dim()
            );
        }
        if self.n_layer < 2 || !self.n_layer.is_multiple_of(2) {
            bail!(
                "n_layer ({}) must be even and >= 2 (half self-, half cross-attention)",
                self.n_layer
            );
        }
        // Positions are u32 (RoPE rows, token positions).
        if self.block_size >= u32::MAX as usize {
            bail!(
                "block_size ({}) is larger than 32-bit positions allow",
                self.block_size
            );
        }
        let g = self.grid_size();
        if self.block_size == 0 || g.checked_mul(g) != Some(self.block_size) {
            bail!(
                "block_size ({}) must be a square number of tokens",
                self.block_size
            );
        }
        if self.vocab_size == 0 || self.num_classes == 0 {
            bail!("vocab_size and num_classes must be positive");
        }
        if self.cls_token_num != 1 {
            bail!(
                "cls_token_num = {} is not supported: class-conditional ARPG uses 1",
                self.cls_token_num
            );
        }
        if self.multiple_of == 0 {
            bail!("multiple_of must be positive");
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            bail!("norm_eps ({}) must be a positive number", self.norm_eps);
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            bail!("rope_base ({}) must be a positive number", self.rope_base);
        }
        if let Some(m) = self.ffn_dim_multiplier {
            if !(m.is_finite() && m > 0.0) {
                bail!("ffn_dim_multiplier ({m}) must be a positive number");
            }
        }
        let hidden = self.checked_ffn_hidden().context(
            "the SwiGLU hidden width (from dim, ffn_dim_multiplier, multiple_of) overflows",
        )?;
        if hidden == 0 {
            bail!("the SwiGLU hidden width is 0 (ffn_dim_multiplier too small for dim)");
        }
        // Token ids are u32: image tokens, mask, classes, null class and the unused row.
        let rows = self
            .vocab_size
            .checked_add(self.num_classes)
            .and_then(|r| r.checked_add(3))
            .filter(|&r| r <= u32::MAX as usize);
        if rows.is_none() {
            bail!(
                "vocab_size ({}) + num_classes ({}) do not fit 32-bit token ids",
                self.vocab_size,
                self.num_classes
            );
        }
        if let Some(c) = &self.control {
            c.validate(self.grid_size())?;
        }
        if self.checked_num_parameters().is_none() {
            bail!(
                "the parameter count overflows (dim {}, n_layer {})",
                self.dim,
                self.n_layer
            );
        }
        Ok(())
    }

    fn checked_ffn_hidden(&self) -> Option<usize> {
        let mut h = self.dim.checked_mul(8)? / 3;
        if let Some(m) = self.ffn_dim_multiplier {
            let x = m * h as f64;
            if !(x.is_finite() && x < (1u64 << 53) as f64) {
                return None;
            }
            h = x as usize;
        }
        h.div_ceil(self.multiple_of).checked_mul(self.multiple_of)
    }

    /// The condition shape `[channels, side, side]` a control model takes (side = grid x
    /// patch); `None` without a control encoder.
    pub fn control_shape(&self) -> Option<(usize, usize, usize)> {
        let c = self.control.as_ref()?;
        let side = self.grid_size() * c.patch;
        Some((c.channels, side, side))
    }

    /// The parameter count, None on overflow.
    pub fn checked_num_parameters(&self) -> Option<usize> {
        let h = self.checked_ffn_hidden()?;
        let d = self.dim;
        let dd = d.checked_mul(d)?;
        let hd = h.checked_mul(d)?;
        let ffn = hd.checked_mul(3)?.checked_add(d.checked_mul(2)?)?;
        let layers = self.self_layers();
        let selfl = dd.checked_mul(4)?.checked_add(ffn)?;
        let cross = dd.checked_mul(2)?.checked_add(ffn)?;
        let rows = self
            .vocab_size
            .checked_add(self.num_classes)?
            .checked_add(3)?;
        let mut n = rows.checked_mul(d)?;
        n = n.checked_add(layers.checked_mul(selfl.checked_add(cross)?)?)?;
        n = n
            .checked_add(dd.checked_mul(2)?)?
            .checked_add(d.checked_mul(2)?)?;
        n = n.checked_add(self.vocab_size.checked_mul(d)?)?;
        if self.abs_pos_embed {
            n = n.checked_add((self.cls_token_num + self.block_size).checked_mul(d)?)?;
        }
        if let Some(c) = &self.control {
            // Patch embedding, position table, blocks, final norm, output projection.
            let patch = c.channels.checked_mul(c.patch)?.checked_mul(c.patch)?;
            n = n.checked_add(patch.checked_mul(d)?)?;
            n = n.checked_add(self.block_size.checked_mul(d)?)?;
            let block = dd.checked_mul(4)?.checked_add(ffn)?;
            n = n.checked_add(c.layers.checked_mul(block)?)?;
            n = n.checked_add(d)?.checked_add(dd)?;
        }
        n.checked_mul(4)?; // bytes in f32
        Some(n)
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }
    pub fn grid_size(&self) -> usize {
        (self.block_size as f64).sqrt().round() as usize
    }
    /// SwiGLU hidden width, as the reference computes it.
    pub fn ffn_hidden(&self) -> usize {
        // Overflow is refused by `validate`; this only keeps unvalidated configs from panicking.
        self.checked_ffn_hidden().unwrap_or(usize::MAX)
    }
    /// Rows of the shared embedding table: image tokens, mask, classes, null class, unused.
    pub fn embedding_rows(&self) -> usize {
        self.vocab_size + 1 + self.num_classes + 1 + 1
    }
    pub fn mask_token(&self) -> u32 {
        self.vocab_size as u32
    }
    pub fn class_token(&self, class: usize) -> u32 {
        (self.vocab_size + 1 + class) as u32
    }
    pub fn null_class_token(&self) -> u32 {
        (self.vocab_size + self.num_classes + 1) as u32
    }
    pub fn self_layers(&self) -> usize {
        self.n_layer / 2
    }

    /// Every parameter name and shape in the reference's state-dict layout, as the model
    /// declares them (see [`crate::model::Arpg::parameter_shapes`]).
    pub fn parameter_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        crate::model::Arpg::parameter_shapes(self)
    }

    /// Parameters of a valid configuration (0 for an invalid one).
    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes().map_or(0, |v| {
            v.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
        })
    }
}

/// LlamaGen VQ tokenizer configuration (keys of the fixtures' `vq_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqConfig {
    #[serde(default = "default_vq_ch")]
    pub ch: usize,
    #[serde(default = "default_vq_ch_mult")]
    pub ch_mult: Vec<usize>,
    #[serde(default = "default_vq_z")]
    pub z_channels: usize,
    #[serde(default = "default_vq_codebook")]
    pub codebook_size: usize,
    #[serde(default = "default_vq_embed")]
    pub embed_dim: usize,
    #[serde(default = "default_vq_res")]
    pub num_res_blocks: usize,
}

fn default_vq_ch() -> usize {
    128
}
fn default_vq_ch_mult() -> Vec<usize> {
    vec![1, 1, 2, 2, 4]
}
fn default_vq_z() -> usize {
    256
}
fn default_vq_codebook() -> usize {
    16384
}
fn default_vq_embed() -> usize {
    8
}
fn default_vq_res() -> usize {
    2
}

impl Default for VqConfig {
    /// The official VQ-16 (`vq_ds16_c2i.pt`).
    fn default() -> Self {
        Self {
            ch: default_vq_ch(),
            ch_mult: default_vq_ch_mult(),
            z_channels: default_vq_z(),
            codebook_size: default_vq_codebook(),
            embed_dim: default_vq_embed(),
            num_res_blocks: default_vq_res(),
        }
    }
}

impl VqConfig {
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = crate::util::read_small(path, MAX_CONFIG_BYTES, "VQ config")?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("invalid VQ config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("invalid VQ config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.ch == 0 || self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            bail!("ch and ch_mult must be positive and non-empty");
        }
        for c in self.ch_mult.iter().map(|m| m * self.ch) {
            if c % 32 != 0 {
                bail!("channel count {c} is not divisible by GroupNorm's 32 groups");
            }
        }
        if self.codebook_size == 0 || self.embed_dim == 0 || self.num_res_blocks == 0 {
            bail!("codebook_size, embed_dim and num_res_blocks must be positive");
        }
        if self.ch_mult.len() > 12 || self.approx_parameters().is_none() {
            bail!(
                "ch {}, ch_mult {:?}, z_channels {}, codebook_size {}, embed_dim {}, num_res_blocks {} are too large",
                self.ch, self.ch_mult, self.z_channels, self.codebook_size, self.embed_dim, self.num_res_blocks
            );
        }
        if self.z_channels == 0 {
            bail!("z_channels must be positive");
        }
        Ok(())
    }

    /// An upper estimate of the parameter count (3x3 convolutions at the widest level), None
    /// on overflow: enough to refuse a configuration that cannot be allocated.
    pub fn approx_parameters(&self) -> Option<u128> {
        let c = self.ch as u128 * *self.ch_mult.iter().max()? as u128;
        let c = c.max(self.z_channels as u128).max(512);
        let convs = (self.ch_mult.len() as u128 + 2) * (self.num_res_blocks as u128 + 1) * 2 * 2;
        let n = convs * 9 * c * c + self.codebook_size as u128 * self.embed_dim as u128;
        (n < 1 << 50).then_some(n)
    }

    /// Pixels per token side: 2^(levels - 1).
    pub fn patch_size(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_queries_parse_by_their_config_names() {
        assert_eq!("add".parse::<ControlQuery>().unwrap(), ControlQuery::Add);
        assert_eq!(
            "replace".parse::<ControlQuery>().unwrap(),
            ControlQuery::Replace
        );
        assert!("swap".parse::<ControlQuery>().is_err());
    }

    #[test]
    fn preset_parameter_counts_match_the_official_checkpoints() {
        // Counts from shared/fixtures/official_shapes.json.
        assert_eq!(
            ArpgConfig::preset("ARPG-L").unwrap().num_parameters(),
            319_845_376
        );
        assert_eq!(
            ArpgConfig::preset("ARPG-XL").unwrap().num_parameters(),
            718_997_760
        );
        assert_eq!(
            ArpgConfig::preset("ARPG-XXL").unwrap().num_parameters(),
            1_302_449_664
        );
        for p in ["ARPG-L", "ARPG-XL", "ARPG-XXL"] {
            let c = ArpgConfig::preset(p).unwrap();
            let by_shapes: usize = c
                .parameter_shapes()
                .unwrap()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            assert_eq!(c.num_parameters(), by_shapes);
            // The overflow-checked count (used before allocating) agrees with the model's.
            assert_eq!(c.checked_num_parameters(), Some(by_shapes));
        }
        assert_eq!(ArpgConfig::preset("ARPG-L").unwrap().ffn_hidden(), 2816);
        assert_eq!(ArpgConfig::preset("ARPG-XL").unwrap().ffn_hidden(), 3584);
        assert_eq!(ArpgConfig::preset("ARPG-XXL").unwrap().ffn_hidden(), 4096);
    }

    #[test]
    fn unknown_preset_and_bad_configs_are_rejected() {
        let e = ArpgConfig::preset("ARPG-Z").unwrap_err().to_string();
        assert!(e.contains("ARPG-Z") && e.contains("ARPG-L"), "{e}");
        let mut c = ArpgConfig::imagenet(64, 4, 4);
        c.block_size = 60;
        assert!(c.validate().unwrap_err().to_string().contains("square"));
        c.block_size = 64;
        c.n_layer = 3;
        assert!(c.validate().unwrap_err().to_string().contains("even"));
    }

    #[test]
    fn zero_negative_non_finite_and_overflowing_values_are_rejected() {
        let ok = ArpgConfig::imagenet(64, 4, 4);
        ok.validate().unwrap();
        type Edit = Box<dyn Fn(&mut ArpgConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.rope_base = 0.0), "rope_base"),
            (Box::new(|c| c.rope_base = f64::NAN), "rope_base"),
            (Box::new(|c| c.norm_eps = -1e-5), "norm_eps"),
            (Box::new(|c| c.norm_eps = f64::INFINITY), "norm_eps"),
            (
                Box::new(|c| c.ffn_dim_multiplier = Some(0.0)),
                "ffn_dim_multiplier",
            ),
            (Box::new(|c| c.ffn_dim_multiplier = Some(1e300)), "hidden"),
            (Box::new(|c| c.multiple_of = 1 << 62), "overflow"),
            (Box::new(|c| c.multiple_of = 0), "multiple_of"),
            (Box::new(|c| c.vocab_size = usize::MAX - 1), "32-bit"),
            (Box::new(|c| c.block_size = usize::MAX), "32-bit"),
            (
                Box::new(|c| {
                    c.dim = 1 << 40;
                    c.n_head = 1 << 36;
                }),
                "overflow",
            ),
        ];
        for (f, needle) in cases {
            let mut c = ok.clone();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }

    #[test]
    fn config_json_rejects_unknown_keys() {
        let r: Result<ArpgConfig, _> = serde_json::from_str(
            r#"{"dim":64,"n_layer":4,"n_head":4,"vocab_size":64,"num_classes":10,"block_size":64,"bogus":1}"#,
        );
        assert!(r.unwrap_err().to_string().contains("bogus"));
    }
}
