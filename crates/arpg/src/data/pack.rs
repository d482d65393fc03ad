//! The packed token file: one memory-mapped file holding every sample's label and crops.
//!
//! Layout (little-endian): magic `ARPGPACK`, version u32, seq_len u32, samples u64,
//! crops u64, checksum u64 (FNV-1a of everything after the header), then labels u32 x
//! samples, crop offsets u64 x (samples + 1), tokens u16 x crops x seq_len. Version 2 (data
//! with conditions, for control models) adds the condition shape to the header (channels,
//! height, width, one u32 each, and a zero u32) and one u8 condition image per crop after
//! the tokens (`[C, H, W]`, 0..255).

use super::Sample;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"ARPGPACK";
const VERSION: u32 = 1;
const VERSION_CONTROL: u32 = 2;
const HEADER: usize = 8 + 4 + 4 + 8 + 8 + 8;
const HEADER_CONTROL: usize = HEADER + 16;

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Collects samples, then writes the file atomically.
#[derive(Default)]
pub struct PackWriter {
    seq_len: Option<usize>,
    labels: Vec<u32>,
    offsets: Vec<u64>,
    tokens: Vec<u16>,
    /// The condition shape and bytes, for data with conditions.
    condition: Option<(usize, usize, usize)>,
    conditions: Vec<u8>,
}

impl PackWriter {
    pub fn new() -> Self {
        Self {
            offsets: vec![0],
            ..Default::default()
        }
    }

    pub fn push(&mut self, s: &Sample) -> Result<()> {
        ensure!(
            self.condition.is_none(),
            "this pack holds conditions: every sample needs one per crop"
        );
        self.push_tokens(s)
    }

    /// A sample with one condition image `[C, H, W]` (u8) per crop; every sample of a pack
    /// has conditions of one shape, or none has.
    pub fn push_with_conditions(
        &mut self,
        s: &Sample,
        shape: (usize, usize, usize),
        conditions: &[Vec<u8>],
    ) -> Result<()> {
        ensure!(
            self.labels.is_empty() || self.condition.is_some(),
            "this pack holds samples without conditions"
        );
        let want = *self.condition.get_or_insert(shape);
        ensure!(
            shape == want && shape.0 * shape.1 * shape.2 > 0,
            "a condition of shape {shape:?}, the pack's are {want:?}"
        );
        ensure!(
            conditions.len() == s.crops.len(),
            "{} conditions for {} crops",
            conditions.len(),
            s.crops.len()
        );
        for c in conditions {
            ensure!(
                c.len() == want.0 * want.1 * want.2,
                "a condition of {} bytes, expected {:?}",
                c.len(),
                want
            );
        }
        self.push_tokens(s)?;
        for c in conditions {
            self.conditions.extend_from_slice(c);
        }
        Ok(())
    }

    fn push_tokens(&mut self, s: &Sample) -> Result<()> {
        ensure!(!s.crops.is_empty(), "a sample needs at least one crop");
        for c in &s.crops {
            let l = *self.seq_len.get_or_insert(c.len());
            ensure!(
                c.len() == l && l > 0,
                "crop of {} tokens, expected {l}",
                c.len()
            );
            self.tokens.extend_from_slice(c);
        }
        self.labels.push(s.label);
        self.offsets
            .push(self.offsets.last().unwrap() + s.crops.len() as u64);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        ensure!(!self.labels.is_empty(), "no samples to pack");
        let mut body = Vec::with_capacity(self.labels.len() * 12 + self.tokens.len() * 2);
        for l in &self.labels {
            body.extend_from_slice(&l.to_le_bytes());
        }
        for o in &self.offsets {
            body.extend_from_slice(&o.to_le_bytes());
        }
        for t in &self.tokens {
            body.extend_from_slice(&t.to_le_bytes());
        }
        body.extend_from_slice(&self.conditions);
        let mut out = Vec::with_capacity(HEADER_CONTROL + body.len());
        out.extend_from_slice(MAGIC);
        let version = match self.condition {
            Some(_) => VERSION_CONTROL,
            None => VERSION,
        };
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(self.seq_len.unwrap() as u32).to_le_bytes());
        out.extend_from_slice(&(self.labels.len() as u64).to_le_bytes());
        out.extend_from_slice(&(*self.offsets.last().unwrap()).to_le_bytes());
        out.extend_from_slice(&fnv1a(&body).to_le_bytes());
        if let Some((c, h, w)) = self.condition {
            for v in [c, h, w, 0] {
                out.extend_from_slice(&(v as u32).to_le_bytes());
            }
        }
        out.extend_from_slice(&body);
        crate::util::write_atomic(path, &out)
    }
}

/// A packed file, memory-mapped and verified (size and checksum) on open.
pub struct Packed {
    map: memmap2::Mmap,
    pub path: PathBuf,
    pub seq_len: usize,
    samples: usize,
    crops: usize,
    /// Where the body starts (after the header).
    body: usize,
    condition: Option<(usize, usize, usize)>,
}

impl Packed {
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::util::open_regular(path, "packed data")?;
        // Safety: the file is opened read-only; a concurrent writer would only replace it by rename.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let err = |m: String| {
            anyhow::anyhow!(
                "packed data {} is corrupt or truncated: {m}",
                path.display()
            )
        };
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(err("not an arpg pack file (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION && version != VERSION_CONTROL {
            bail!(
                "packed data {}: version {version} is not supported (expected {VERSION} or \
                 {VERSION_CONTROL})",
                path.display(),
            );
        }
        let (body, condition) = if version == VERSION_CONTROL {
            if map.len() < HEADER_CONTROL {
                return Err(err("the header is cut".into()));
            }
            let (c, h, w) = (u32_at(40), u32_at(44), u32_at(48));
            if c == 0 || h == 0 || w == 0 {
                return Err(err(format!("a condition shape of {c}x{h}x{w}")));
            }
            (HEADER_CONTROL, Some((c as usize, h as usize, w as usize)))
        } else {
            (HEADER, None)
        };
        let cond_bytes = condition.map_or(0u128, |(c, h, w)| c as u128 * h as u128 * w as u128);
        let seq_len = u32_at(12) as usize;
        let samples = u64_at(16) as usize;
        let crops = u64_at(24) as usize;
        let want = body as u128
            + samples as u128 * 4
            + (samples as u128 + 1) * 8
            + crops as u128 * seq_len as u128 * 2
            + crops as u128 * cond_bytes;
        if map.len() as u128 != want {
            return Err(err(format!(
                "{} bytes, the header promises {want}",
                map.len()
            )));
        }
        if samples == 0 || seq_len == 0 {
            return Err(err(format!("{samples} samples of {seq_len} tokens")));
        }
        if fnv1a(&map[body..]) != u64_at(32) {
            return Err(err("checksum mismatch".into()));
        }
        let p = Self {
            map,
            path: path.to_path_buf(),
            seq_len,
            samples,
            crops,
            body,
            condition,
        };
        for i in 0..samples {
            let (a, b) = (p.offset(i), p.offset(i + 1));
            if b <= a || b as usize > crops {
                return Err(err(format!("bad crop offsets for sample {i}")));
            }
        }
        Ok(p)
    }

    pub fn len(&self) -> usize {
        self.samples
    }
    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }
    pub fn total_crops(&self) -> usize {
        self.crops
    }

    fn offset(&self, i: usize) -> u64 {
        let o = self.body + self.samples * 4 + i * 8;
        u64::from_le_bytes(self.map[o..o + 8].try_into().unwrap())
    }

    pub fn label(&self, i: usize) -> u32 {
        let o = self.body + i * 4;
        u32::from_le_bytes(self.map[o..o + 4].try_into().unwrap())
    }

    pub fn n_crops(&self, i: usize) -> usize {
        (self.offset(i + 1) - self.offset(i)) as usize
    }

    /// Tokens of crop `c` of sample `i`.
    pub fn tokens(&self, i: usize, c: usize) -> Vec<u16> {
        let crop = self.offset(i) as usize + c;
        let base = self.tokens_start() + crop * self.seq_len * 2;
        self.map[base..base + self.seq_len * 2]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    fn tokens_start(&self) -> usize {
        self.body + self.samples * 4 + (self.samples + 1) * 8
    }

    /// The shape `[C, H, W]` of the conditions, for data packed with them.
    pub fn condition_shape(&self) -> Option<(usize, usize, usize)> {
        self.condition
    }

    /// The condition image (u8, `[C, H, W]`) of crop `c` of sample `i`; empty without
    /// conditions.
    pub fn condition(&self, i: usize, c: usize) -> &[u8] {
        let Some((ch, h, w)) = self.condition else {
            return &[];
        };
        let n = ch * h * w;
        let crop = self.offset(i) as usize + c;
        let base = self.tokens_start() + self.crops * self.seq_len * 2 + crop * n;
        &self.map[base..base + n]
    }

    pub fn max_label(&self) -> u32 {
        (0..self.samples).map(|i| self.label(i)).max().unwrap_or(0)
    }
    pub fn max_token(&self) -> u16 {
        (0..self.samples)
            .flat_map(|i| (0..self.n_crops(i)).flat_map(move |c| self.tokens(i, c)))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.pack");
        let mut w = PackWriter::new();
        w.push(&Sample {
            label: 3,
            crops: vec![vec![1, 2, 3, 4]],
        })
        .unwrap();
        w.push(&Sample {
            label: 7,
            crops: vec![vec![5, 6, 7, 8], vec![9, 10, 11, 12]],
        })
        .unwrap();
        assert!(w
            .push(&Sample {
                label: 1,
                crops: vec![vec![1, 2]]
            })
            .is_err());
        w.write(&p).unwrap();
        let r = Packed::open(&p).unwrap();
        assert_eq!((r.len(), r.seq_len, r.total_crops()), (2, 4, 3));
        assert_eq!((r.label(0), r.label(1), r.n_crops(1)), (3, 7, 2));
        assert_eq!(r.tokens(1, 1), vec![9, 10, 11, 12]);
        let bytes = std::fs::read(&p).unwrap();
        let q = dir.path().join("trunc.pack");
        std::fs::write(&q, &bytes[..bytes.len() - 2]).unwrap();
        let e = Packed::open(&q).err().unwrap().to_string();
        assert!(e.contains("trunc.pack") && e.contains("truncated"), "{e}");
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&q, &flipped).unwrap();
        assert!(Packed::open(&q)
            .err()
            .unwrap()
            .to_string()
            .contains("checksum"));
        assert_eq!(r.condition_shape(), None);
        assert!(r.condition(1, 0).is_empty());
    }

    #[test]
    fn conditions_are_stored_per_crop_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.pack");
        let mut w = PackWriter::new();
        let s1 = Sample {
            label: 1,
            crops: vec![vec![1, 2]],
        };
        let s2 = Sample {
            label: 2,
            crops: vec![vec![3, 4], vec![5, 6]],
        };
        let shape = (1, 2, 3);
        w.push_with_conditions(&s1, shape, &[vec![9; 6]]).unwrap();
        // A plain sample, a wrong shape or count, in a pack with conditions: refused.
        assert!(w.push(&s1).is_err());
        assert!(w
            .push_with_conditions(&s1, (1, 3, 2), &[vec![9; 6]])
            .is_err());
        assert!(w.push_with_conditions(&s2, shape, &[vec![7; 6]]).is_err());
        w.push_with_conditions(&s2, shape, &[vec![7; 6], (0..6).collect()])
            .unwrap();
        w.write(&p).unwrap();
        let r = Packed::open(&p).unwrap();
        assert_eq!(r.condition_shape(), Some(shape));
        assert_eq!(r.tokens(1, 1), vec![5, 6]);
        assert_eq!(r.condition(0, 0), &[9; 6]);
        assert_eq!(r.condition(1, 0), &[7; 6]);
        assert_eq!(r.condition(1, 1), &[0, 1, 2, 3, 4, 5]);
        let bytes = std::fs::read(&p).unwrap();
        let q = dir.path().join("cut.pack");
        std::fs::write(&q, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Packed::open(&q).is_err());
        // A pack without conditions takes no conditioned sample.
        let mut plain = PackWriter::new();
        plain.push(&s1).unwrap();
        assert!(plain
            .push_with_conditions(&s2, shape, &[vec![0; 6], vec![0; 6]])
            .is_err());
    }
}
