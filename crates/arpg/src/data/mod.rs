//! Training data: pre-tokenized images in the layouts users already have, packed into one
//! memory-mapped file, and the UCI digits.

pub mod digits;
pub mod layouts;
pub mod npy;
pub mod pack;
pub mod tokenize;

pub use pack::{PackWriter, Packed};

use anyhow::Result;
use std::path::Path;

/// Where `arpg pack` reads its samples.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// The paper's layout (`ROOT/<class id>/*.npy`), tokens below `vocab_size`.
    Paper(&'a Path, usize),
    /// LlamaGen's layout (`ROOT/codes`, `ROOT/labels`), tokens below `vocab_size`.
    Llamagen(&'a Path, usize),
    /// The UCI digits CSV: its training split, or its test split (`test`).
    Digits(&'a Path, bool),
}

/// Packs every sample of `source` into `out`, with its conditions when `conditions` (the
/// paper layout's stored `.control.npy`; a digit's stroke sketch). Returns the samples packed.
pub fn pack(source: Source, conditions: bool, out: &Path) -> Result<usize> {
    let samples: Vec<(Sample, Option<layouts::Conditions>)> = match source {
        Source::Paper(r, v) if conditions => layouts::read_paper_layout_with_conditions(r, v)?
            .into_iter()
            .map(|(s, c)| (s, Some(c)))
            .collect(),
        Source::Paper(r, v) => plain(layouts::read_paper_layout(r, v)?),
        Source::Llamagen(r, v) => plain(layouts::read_llamagen_layout(r, v)?),
        Source::Digits(p, test) => {
            let (train, test_split) = digits::split(&digits::load_csv_gz(p)?);
            let part = if test { test_split } else { train };
            part.iter()
                .map(|d| {
                    let s = Sample {
                        label: d.label,
                        crops: vec![d.pixels.iter().map(|&v| v as u16).collect()],
                    };
                    let sketch = crate::control::digit_sketch(&d.pixels).to_vec();
                    (s, conditions.then(|| ((1, 8, 8), vec![sketch])))
                })
                .collect()
        }
    };
    let mut w = PackWriter::new();
    for (s, c) in &samples {
        match c {
            Some((shape, conds)) => w.push_with_conditions(s, *shape, conds)?,
            None => w.push(s)?,
        }
    }
    w.write(out)?;
    Ok(w.len())
}

fn plain(samples: Vec<Sample>) -> Vec<(Sample, Option<layouts::Conditions>)> {
    samples.into_iter().map(|s| (s, None)).collect()
}

/// One training sample: a class label and one or more augmented crops of the same length.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub label: u32,
    pub crops: Vec<Vec<u16>>,
}

/// What `arpg pack` asks for: one source of samples (its path as given), whether to store
/// their conditions (`sketch` for the digits, `stored` for the paper's layout), the file.
#[derive(Debug, Clone, Default)]
pub struct PackJob {
    pub paper: Option<std::path::PathBuf>,
    pub llamagen: Option<std::path::PathBuf>,
    pub digits: Option<std::path::PathBuf>,
    /// With `digits`: its test split instead of its training split.
    pub test_split: bool,
    pub control: Option<String>,
    /// Largest token id + 1 accepted.
    pub vocab_size: usize,
    pub out: std::path::PathBuf,
}

impl PackJob {
    /// Packs the source ([`pack`]); the samples packed.
    pub fn run(&self) -> Result<usize> {
        match (self.control.as_deref(), &self.digits, &self.paper) {
            (Some("sketch"), None, _) => anyhow::bail!("--control sketch is for --digits"),
            (Some("stored"), _, None) => anyhow::bail!("--control stored is for --paper"),
            _ => {}
        }
        let source = match (&self.paper, &self.llamagen, &self.digits) {
            (Some(r), _, _) => Source::Paper(r, self.vocab_size),
            (_, Some(r), _) => Source::Llamagen(r, self.vocab_size),
            (_, _, Some(p)) => Source::Digits(p, self.test_split),
            _ => anyhow::bail!("give one of --paper ROOT, --llamagen ROOT or --digits FILE.csv.gz"),
        };
        pack(source, self.control.is_some(), &self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_job_takes_one_source_and_the_conditions_it_has() {
        let run = |j: PackJob| j.run().unwrap_err().to_string();
        let e = run(PackJob::default());
        assert!(e.contains("give one of --paper"), "{e}");
        let e = run(PackJob {
            paper: Some("p".into()),
            control: Some("sketch".into()),
            ..Default::default()
        });
        assert!(e.contains("--control sketch is for --digits"), "{e}");
        let e = run(PackJob {
            digits: Some("d.csv.gz".into()),
            control: Some("stored".into()),
            ..Default::default()
        });
        assert!(e.contains("--control stored is for --paper"), "{e}");
    }
}
