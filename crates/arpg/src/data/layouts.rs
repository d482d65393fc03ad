//! Readers for the pre-tokenized layouts of the paper's code and of LlamaGen.

use super::{npy, Sample};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Split an integer array of shape `(1, n_aug, L)`, `(n_aug, L)` or `(L,)` into crops.
pub fn crops_from_npy(path: &Path, vocab_limit: usize) -> Result<Vec<Vec<u16>>> {
    let a = npy::read(path)?;
    let v = a.ints(path)?;
    let (n, l) = match a.shape[..] {
        [1, n, l] | [n, l] => (n, l),
        [l] => (1, l),
        _ => bail!(
            "{}: shape {:?}, expected (1, n_aug, L), (n_aug, L) or (L,)",
            path.display(),
            a.shape
        ),
    };
    if n == 0 || l == 0 {
        bail!("{}: empty array", path.display());
    }
    if let Some(bad) = v.iter().find(|&&x| x < 0 || x as u64 >= vocab_limit as u64) {
        bail!(
            "{}: token {bad} is out of range (0..{vocab_limit})",
            path.display()
        );
    }
    // Packed tokens are u16: a larger id would be stored as another token.
    if let Some(bad) = v.iter().find(|&&x| x > u16::MAX as i64) {
        bail!(
            "{}: token {bad} does not fit the packed format's 16 bits (ids up to {}); \
             a --vocab-size above {} cannot be packed",
            path.display(),
            u16::MAX,
            u16::MAX as usize + 1
        );
    }
    Ok(v.chunks_exact(l)
        .map(|c| c.iter().map(|&x| x as u16).collect())
        .collect())
}

fn npy_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "npy"))
        // Conditions written beside the codes are not codes.
        .filter(|p| !p.to_string_lossy().ends_with(CONTROL_SUFFIX))
        .collect();
    files.sort();
    Ok(files)
}

/// The file beside `<name>.npy` holding its conditions (`arpg tokenize --control`).
pub const CONTROL_SUFFIX: &str = ".control.npy";

/// Where the conditions of the codes file `codes` are stored.
pub fn control_path(codes: &Path) -> PathBuf {
    let stem = codes.file_stem().unwrap_or_default().to_string_lossy();
    codes.with_file_name(format!("{stem}{CONTROL_SUFFIX}"))
}

/// One condition shape `[C, H, W]` and one u8 condition per crop.
pub type Conditions = ((usize, usize, usize), Vec<Vec<u8>>);

/// The conditions of `codes` (a u8 array `(n_aug, C, H, W)`, or `(C, H, W)` for one crop),
/// checked against its `n_crops`.
pub fn read_conditions(codes: &Path, n_crops: usize) -> Result<Conditions> {
    let p = control_path(codes);
    let a = npy::read(&p).with_context(|| {
        format!(
            "no condition for {} (expected {}; tokenize with --control)",
            codes.display(),
            p.display()
        )
    })?;
    let (n, c, h, w) = match a.shape[..] {
        [n, c, h, w] => (n, c, h, w),
        [c, h, w] => (1, c, h, w),
        _ => bail!(
            "{}: shape {:?}, expected (n_aug, C, H, W)",
            p.display(),
            a.shape
        ),
    };
    if !a.descr.ends_with("u1") {
        bail!("{}: dtype {}, expected uint8", p.display(), a.descr);
    }
    if n != n_crops || c == 0 || h == 0 || w == 0 {
        bail!(
            "{}: {n} conditions of {c}x{h}x{w} for {} crops of {}",
            p.display(),
            n_crops,
            codes.display()
        );
    }
    let v = a.ints(&p)?;
    let per = c * h * w;
    let conds = v
        .chunks_exact(per)
        .map(|x| x.iter().map(|&b| b as u8).collect())
        .collect();
    Ok(((c, h, w), conds))
}

/// [`read_paper_layout`] with each sample's conditions.
pub fn read_paper_layout_with_conditions(
    root: &Path,
    vocab_limit: usize,
) -> Result<Vec<(Sample, Conditions)>> {
    let mut out = Vec::new();
    for (s, f) in paper_samples(root, vocab_limit)? {
        let conds = read_conditions(&f, s.crops.len())?;
        out.push((s, conds));
    }
    Ok(out)
}

/// The paper's layout: `root/<class id>/<anything>.npy`.
pub fn read_paper_layout(root: &Path, vocab_limit: usize) -> Result<Vec<Sample>> {
    Ok(paper_samples(root, vocab_limit)?
        .into_iter()
        .map(|s| s.0)
        .collect())
}

fn paper_samples(root: &Path, vocab_limit: usize) -> Result<Vec<(Sample, PathBuf)>> {
    let mut classes: Vec<(u32, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let p = e?.path();
        if p.is_dir() {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let id: u32 = name.parse().with_context(|| {
                format!(
                    "{}: class folders must be named by their class id",
                    p.display()
                )
            })?;
            classes.push((id, p));
        }
    }
    classes.sort();
    if classes.is_empty() {
        bail!("{}: no class folders", root.display());
    }
    let mut out = Vec::new();
    for (label, dir) in classes {
        for f in npy_files(&dir)? {
            let s = Sample {
                label,
                crops: crops_from_npy(&f, vocab_limit)?,
            };
            out.push((s, f));
        }
    }
    Ok(out)
}

/// LlamaGen's layout: `root/codes/<name>.npy` with `root/labels/<name>.npy` beside it.
pub fn read_llamagen_layout(root: &Path, vocab_limit: usize) -> Result<Vec<Sample>> {
    let codes = root.join("codes");
    let labels = root.join("labels");
    let mut out = Vec::new();
    for f in npy_files(&codes)? {
        let lp = labels.join(f.file_name().unwrap());
        let l = npy::read(&lp).with_context(|| format!("no label for {}", f.display()))?;
        let lv = l.ints(&lp)?;
        if lv.len() != 1 || lv[0] < 0 {
            bail!("{}: expected one non-negative label", lp.display());
        }
        let label = u32::try_from(lv[0]).map_err(|_| {
            anyhow::anyhow!(
                "{}: label {} does not fit the packed format's 32 bits",
                lp.display(),
                lv[0]
            )
        })?;
        out.push(Sample {
            label,
            crops: crops_from_npy(&f, vocab_limit)?,
        });
    }
    if out.is_empty() {
        bail!("{}: no .npy files under codes/", root.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_i64(p: &Path, shape: &[usize], v: &[i64]) {
        let body: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(p, npy::to_bytes("<i8", shape, &body)).unwrap();
    }

    #[test]
    fn reads_both_layouts() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("paper");
        std::fs::create_dir_all(r.join("5")).unwrap();
        std::fs::create_dir_all(r.join("12")).unwrap();
        write_i64(&r.join("5/a.npy"), &[1, 2, 4], &[0, 1, 2, 3, 4, 5, 6, 7]);
        write_i64(&r.join("12/b.npy"), &[4], &[9, 9, 9, 9]);
        let s = read_paper_layout(&r, 16).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            Sample {
                label: 5,
                crops: vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
            }
        );
        assert_eq!(s[1].label, 12);
        assert!(read_paper_layout(&r, 8)
            .unwrap_err()
            .to_string()
            .contains("out of range"));

        let l = d.path().join("llamagen");
        std::fs::create_dir_all(l.join("codes")).unwrap();
        std::fs::create_dir_all(l.join("labels")).unwrap();
        write_i64(&l.join("codes/0.npy"), &[1, 1, 4], &[1, 2, 3, 4]);
        write_i64(&l.join("labels/0.npy"), &[1], &[3]);
        let s = read_llamagen_layout(&l, 16).unwrap();
        assert_eq!(
            s,
            vec![Sample {
                label: 3,
                crops: vec![vec![1, 2, 3, 4]]
            }]
        );
        write_i64(&l.join("codes/1.npy"), &[4], &[1, 2, 3, 4]);
        assert!(read_llamagen_layout(&l, 16)
            .unwrap_err()
            .to_string()
            .contains("no label"));
    }
}
