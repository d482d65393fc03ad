//! How many tokens each decoding step predicts, and the guidance weight at each step.

use anyhow::{bail, Result};
use std::str::FromStr;

/// Fraction of tokens still masked after each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskSchedule {
    /// `arccos((s+1)/S) / (pi/2)`: the paper's default.
    Arccos,
    /// `cos(pi/2 * (s+1)/S)`.
    Cosine,
}

impl FromStr for MaskSchedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "arccos" => Ok(Self::Arccos),
            "cosine" => Ok(Self::Cosine),
            _ => bail!("unknown schedule {s:?}: expected arccos or cosine"),
        }
    }
}

/// Classifier-free guidance weight over the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgSchedule {
    Constant,
    /// `1 + (cfg - 1) * decoded / total`, counting the tokens decoded after this step.
    Linear,
}

impl FromStr for CfgSchedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            _ => bail!("unknown cfg schedule {s:?}: expected constant or linear"),
        }
    }
}

/// Tokens predicted at each of `steps` steps for `total` tokens, as the reference computes
/// them (mask length floored, clamped to [1, remaining - 1], the last step takes the rest).
/// Steps that would predict nothing (possible when `steps` is close to `total`) are dropped:
/// feeding their tokens one step later gives the same cache and the same result.
pub fn token_counts(total: usize, steps: usize, schedule: MaskSchedule) -> Result<Vec<usize>> {
    if total == 0 {
        bail!("nothing to decode: 0 unknown tokens");
    }
    if steps == 0 || steps > total {
        bail!("--steps {steps} is impossible for {total} tokens: use 1..={total}");
    }
    let mut counts = Vec::with_capacity(steps);
    let mut pos = 0usize;
    for s in 0..steps {
        let t = (s + 1) as f64 / steps as f64;
        let ratio = match schedule {
            MaskSchedule::Arccos => t.acos() / std::f64::consts::FRAC_PI_2,
            MaskSchedule::Cosine => (std::f64::consts::FRAC_PI_2 * t).cos(),
        };
        let remaining = total - pos;
        let mask_len = ((total as f64 * ratio) as i64)
            .min(remaining as i64 - 1)
            .max(1) as usize;
        let n = if s == steps - 1 {
            remaining
        } else {
            remaining.saturating_sub(mask_len)
        };
        if n > 0 {
            counts.push(n);
        }
        pos += n;
    }
    debug_assert_eq!(pos, total);
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cover_every_token_once() {
        for total in [1, 2, 16, 64, 255, 256] {
            for steps in 1..=total.min(70) {
                for s in [MaskSchedule::Arccos, MaskSchedule::Cosine] {
                    let c = token_counts(total, steps, s).unwrap();
                    assert_eq!(c.iter().sum::<usize>(), total);
                    assert!(c.iter().all(|&n| n > 0));
                    assert!(c.len() <= steps);
                }
            }
        }
    }

    #[test]
    fn arccos_starts_small_and_grows() {
        let c = token_counts(256, 64, MaskSchedule::Arccos).unwrap();
        assert_eq!(c.len(), 64);
        // floor(256 * arccos(1/64) / (pi/2)) = 253 still masked after step 0.
        assert_eq!(c[0], 3);
        assert!(c[63] > c[0]);
    }

    #[test]
    fn impossible_step_counts_are_rejected() {
        assert!(token_counts(64, 0, MaskSchedule::Arccos)
            .unwrap_err()
            .to_string()
            .contains("--steps 0"));
        assert!(token_counts(64, 65, MaskSchedule::Arccos).is_err());
        assert!(token_counts(64, 64, MaskSchedule::Arccos).is_ok());
    }
}
