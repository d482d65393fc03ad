//! The statistics of ADM's evaluator (guided-diffusion `evaluations/evaluator.py`): Fréchet
//! distance between Gaussians fitted to Inception features (FID on `pool_3`, sFID on the
//! spatial features), the Inception Score, and improved precision/recall with k-NN manifolds.
//!
//! Means and covariances are f64. Instead of `scipy.linalg.sqrtm(S1 @ S2)` (a Schur
//! decomposition of a non-symmetric matrix) the trace of the square root is taken from a
//! symmetric PSD matrix with the same eigenvalues as `S1 S2` (`sqrt(S1) S2 sqrt(S1)`, formed
//! through a Cholesky factor of S1): `tr sqrt(S1 S2) = sum_i sqrt(lambda_i)`. No complex parts
//! and no singular-product retry.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, D};

/// Mean and covariance of a set of feature vectors.
#[derive(Debug, Clone)]
pub struct Gaussian {
    pub mu: Vec<f64>,
    /// Row-major dim x dim.
    pub sigma: Vec<f64>,
    /// For a fit to n <= dim vectors: sigma = A^T A with A the n x dim centred features over
    /// sqrt(n - 1), so that tr sqrt(S1 S2) reduces to an n x n problem (few samples).
    factor: Option<(usize, Vec<f64>)>,
}

impl Gaussian {
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    /// Fit to `n` rows of `dim` features: the mean and the unbiased covariance (`np.cov`,
    /// N - 1). The products run on `device` in f64.
    pub fn fit(features: &[f32], dim: usize, device: &Device) -> Result<Self> {
        let n = features.len() / dim.max(1);
        ensure!(
            dim > 0 && n * dim == features.len(),
            "{} feature values do not divide into rows of {dim}",
            features.len()
        );
        ensure!(
            n >= 2,
            "a covariance needs at least 2 feature vectors, got {n}"
        );
        let x = Tensor::from_slice(features, (n, dim), device)?.to_dtype(DType::F64)?;
        let mu = x.mean(0)?;
        let xc = x.broadcast_sub(&mu)?;
        let sigma = (xc.t()?.matmul(&xc)? / (n as f64 - 1.0))?;
        let factor = match n <= dim {
            true => Some((n, (xc / (n as f64 - 1.0).sqrt())?.flatten_all()?.to_vec1()?)),
            false => None,
        };
        Ok(Self {
            mu: mu.to_vec1()?,
            sigma: sigma.flatten_all()?.to_vec1()?,
            factor,
        })
    }

    /// From given arrays (e.g. a reference batch's precomputed `mu` / `sigma`), checked: finite,
    /// and sigma a symmetric positive semi-definite matrix, else the distance would be NaN or a
    /// meaningless number.
    pub fn new(mu: Vec<f64>, sigma: Vec<f64>) -> Result<Self> {
        let d = mu.len();
        ensure!(
            sigma.len() == d * d,
            "sigma has {} values, expected {d} x {d} for a mean of {d}",
            sigma.len()
        );
        if let Some(i) = mu.iter().position(|x| !x.is_finite()) {
            bail!("mu[{i}] is {}", mu[i]);
        }
        if let Some(i) = sigma.iter().position(|x| !x.is_finite()) {
            bail!("sigma[{}, {}] is {}", i / d, i % d, sigma[i]);
        }
        let scale = sigma.iter().fold(0f64, |m, x| m.max(x.abs()));
        for i in 0..d {
            for j in 0..i {
                let (a, b) = (sigma[i * d + j], sigma[j * d + i]);
                ensure!(
                    (a - b).abs() <= 1e-6 * scale,
                    "sigma is not symmetric: [{i}, {j}] = {a}, [{j}, {i}] = {b}"
                );
            }
        }
        let (_, _, rank, residual) = pivoted_cholesky_residual(&sigma, d)?;
        ensure!(
            residual <= 1e-5 * scale,
            "sigma is not positive semi-definite (a covariance must be): after {rank} pivots of \
             its Cholesky factorisation, {residual:.3e} remains (largest entry {scale:.3e})"
        );
        Ok(Self {
            mu,
            sigma,
            factor: None,
        })
    }
}

/// The Fréchet distance between two Gaussians:
/// `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64> {
    let d = a.dim();
    ensure!(
        b.dim() == d,
        "the two sets of statistics have different dimensions ({d} and {})",
        b.dim()
    );
    let diff: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let tr = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    // tr sqrt(S1 S2) = tr sqrt(S2 S1): use whichever side has a low-rank factor.
    let cross = match (&a.factor, &b.factor) {
        (Some((n, f)), _) | (None, Some((n, f))) => {
            let other = if a.factor.is_some() { b } else { a };
            trace_sqrt_low_rank(f, *n, &other.sigma, d)?
        }
        (None, None) => trace_sqrt_product(&a.sigma, &b.sigma, d)?,
    };
    Ok(diff + tr(&a.sigma) + tr(&b.sigma) - 2.0 * cross)
}

/// `tr sqrt(A^T A S)` for A of `n` x d: the non-zero eigenvalues of A^T A S are those of the
/// n x n symmetric PSD matrix `A S A^T`.
fn trace_sqrt_low_rank(a: &[f64], n: usize, s: &[f64], d: usize) -> Result<f64> {
    let cpu = Device::Cpu;
    let a = Tensor::from_slice(a, (n, d), &cpu)?;
    let s = Tensor::from_slice(s, (d, d), &cpu)?;
    let m: Vec<f64> = a.matmul(&s)?.matmul(&a.t()?)?.flatten_all()?.to_vec1()?;
    eigen_sqrt_trace(&m, n)
}

/// Sum of the square roots of the eigenvalues of a (nearly) symmetric PSD matrix.
fn eigen_sqrt_trace(m: &[f64], n: usize) -> Result<f64> {
    // Symmetrise away rounding so that the tridiagonal reduction sees a symmetric matrix.
    let mut sym = m.to_vec();
    for i in 0..n {
        for j in 0..n {
            sym[i * n + j] = 0.5 * (m[i * n + j] + m[j * n + i]);
        }
    }
    let (ev, _) = symmetric_eigen(&sym, n, false)?;
    // Tiny negative eigenvalues are rounding of zeros (rank-deficient covariances).
    Ok(ev.iter().map(|&x| x.max(0.0).sqrt()).sum())
}

/// `tr sqrt(S1 S2)` for symmetric PSD S1, S2. With a pivoted Cholesky factor S1 = P L L^T P^T
/// (L of d x r, r the numerical rank) the eigenvalues of S1 S2 are those of the symmetric PSD
/// r x r matrix `L^T (P^T S2 P) L`, of which only the eigenvalues are needed. (Eigenvectors of
/// S1 for `sqrt(S1) S2 sqrt(S1)` would cost about 6x more at d = 2048.)
pub fn trace_sqrt_product(s1: &[f64], s2: &[f64], d: usize) -> Result<f64> {
    let (l, perm, r) = pivoted_cholesky(s1, d)?;
    if r == 0 {
        return Ok(0.0);
    }
    let s2p: Vec<f64> = (0..d * d)
        .map(|i| s2[perm[i / d] * d + perm[i % d]])
        .collect();
    let cpu = Device::Cpu;
    let l = Tensor::from_vec(l, (d, d), &cpu)?.narrow(1, 0, r)?;
    let s2p = Tensor::from_vec(s2p, (d, d), &cpu)?;
    let m: Vec<f64> = l.t()?.matmul(&s2p.matmul(&l)?)?.flatten_all()?.to_vec1()?;
    eigen_sqrt_trace(&m, r)
}

/// Cholesky factorisation of a symmetric PSD matrix with diagonal pivoting (as LAPACK's
/// dpstrf): returns L (d x d row-major, columns past the rank are zero), the permutation (row
/// i of L belongs to variable perm[i]) and the numerical rank, stopping where the remaining
/// diagonal falls below d * eps * max diag.
pub fn pivoted_cholesky(s: &[f64], d: usize) -> Result<(Vec<f64>, Vec<usize>, usize)> {
    let (l, perm, rank, _) = pivoted_cholesky_residual(s, d)?;
    Ok((l, perm, rank))
}

/// [`pivoted_cholesky`], with the largest magnitude left in the trailing matrix where it
/// stopped: about zero for a PSD matrix, large for an indefinite one.
fn pivoted_cholesky_residual(s: &[f64], d: usize) -> Result<(Vec<f64>, Vec<usize>, usize, f64)> {
    ensure!(
        s.len() == d * d,
        "matrix has {} values, not {d} x {d}",
        s.len()
    );
    if s.iter().any(|x| !x.is_finite()) {
        bail!("covariance has non-finite entries");
    }
    let mut a = s.to_vec();
    let mut l = vec![0.0; d * d];
    let mut perm: Vec<usize> = (0..d).collect();
    let max_diag = (0..d).map(|i| a[i * d + i]).fold(0.0, f64::max);
    let tol = d as f64 * f64::EPSILON * max_diag;
    let mut rank = 0;
    let mut col = vec![0.0; d];
    for k in 0..d {
        let p = (k..d)
            .max_by(|&i, &j| a[i * d + i].total_cmp(&a[j * d + j]))
            .unwrap_or(k);
        if a[p * d + p] <= tol {
            break;
        }
        if p != k {
            // Symmetric swap of variables k and p in the trailing matrix and in L's rows.
            for j in 0..d {
                a.swap(k * d + j, p * d + j);
            }
            for i in 0..d {
                a.swap(i * d + k, i * d + p);
            }
            for j in 0..k {
                l.swap(k * d + j, p * d + j);
            }
            perm.swap(k, p);
        }
        let piv = a[k * d + k].sqrt();
        l[k * d + k] = piv;
        for i in k + 1..d {
            col[i] = a[i * d + k] / piv;
            l[i * d + k] = col[i];
        }
        // Schur complement of the trailing block (full rows: contiguous and simple).
        for i in k + 1..d {
            let ci = col[i];
            if ci == 0.0 {
                continue;
            }
            let row = &mut a[i * d + k + 1..i * d + d];
            for (x, &cj) in row.iter_mut().zip(&col[k + 1..d]) {
                *x -= ci * cj;
            }
        }
        rank = k + 1;
    }
    let mut residual = 0f64;
    for i in rank..d {
        for j in rank..d {
            residual = residual.max(a[i * d + j].abs());
        }
    }
    Ok((l, perm, rank, residual))
}

/// Eigen-decomposition of a symmetric matrix (row-major, d x d), by nalgebra's
/// `SymmetricEigen` (Householder tridiagonalisation, implicit QR). Returns the eigenvalues
/// and, if asked, the eigenvectors as the rows of a d x d matrix. It replaced our own EISPACK
/// tred2/tql2: the same eigenvalues to 7e-13 at d = 2048; eigenvalues alone 4.4 s there
/// against 3.3 s, with vectors 13.8 s against 19.5 s (one core), so FID's one 2048-wide
/// decomposition costs about a second more of an evaluation that takes minutes.
pub fn symmetric_eigen(a: &[f64], n: usize, vectors: bool) -> Result<(Vec<f64>, Vec<f64>)> {
    ensure!(
        a.len() == n * n,
        "matrix has {} values, not {n} x {n}",
        a.len()
    );
    if a.iter().any(|x| !x.is_finite()) {
        bail!("matrix has non-finite entries");
    }
    if n == 0 {
        return Ok((vec![], vec![]));
    }
    let m = nalgebra::DMatrix::from_row_slice(n, n, a);
    if !vectors {
        return Ok((m.symmetric_eigenvalues().as_slice().to_vec(), vec![]));
    }
    let e = nalgebra::SymmetricEigen::new(m);
    // Column-major storage: eigenvector j (column j) is row j of the row-major result.
    Ok((
        e.eigenvalues.as_slice().to_vec(),
        e.eigenvectors.as_slice().to_vec(),
    ))
}

/// How the Inception Score splits the samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsSplits {
    /// Consecutive chunks of this many samples, the last one possibly shorter (ADM: 5000).
    Size(usize),
    /// This many near-equal consecutive parts (improved-GAN / torch-fidelity: 10).
    Count(usize),
}

/// The Inception Score from classifier logits (`n` rows of `classes`): the mean over splits
/// of `exp(E_x KL(p(y|x) || p(y)))`; also the standard deviation over splits.
pub fn inception_score(logits: &[f32], classes: usize, splits: IsSplits) -> Result<(f64, f64)> {
    let n = logits.len() / classes.max(1);
    ensure!(
        classes > 0 && n * classes == logits.len(),
        "{} logits do not divide into rows of {classes}",
        logits.len()
    );
    ensure!(n >= 1, "the Inception Score needs at least 1 sample");
    // log-softmax in f64: log p stays finite where float32 softmax would underflow to 0.
    let logp: Vec<f64> = logits
        .chunks_exact(classes)
        .flat_map(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            row.iter().map(move |&x| x as f64 - lse)
        })
        .collect();
    let bounds: Vec<(usize, usize)> = match splits {
        IsSplits::Size(s) => {
            ensure!(s >= 1, "the Inception Score split size must be at least 1");
            (0..n).step_by(s).map(|a| (a, (a + s).min(n))).collect()
        }
        IsSplits::Count(k) => {
            ensure!(
                k >= 1 && k <= n,
                "{k} Inception Score splits need at least {k} samples, got {n}"
            );
            (0..k).map(|i| (i * n / k, (i + 1) * n / k)).collect()
        }
    };
    let scores: Vec<f64> = bounds
        .iter()
        .map(|&(a, b)| {
            let part = &logp[a * classes..b * classes];
            let m = (b - a) as f64;
            let mut mean_p = vec![0.0; classes];
            for row in part.chunks_exact(classes) {
                for (acc, &lp) in mean_p.iter_mut().zip(row) {
                    *acc += lp.exp() / m;
                }
            }
            let log_mean: Vec<f64> = mean_p.iter().map(|x| x.ln()).collect();
            let kl: f64 = part
                .chunks_exact(classes)
                .map(|row| {
                    row.iter()
                        .zip(&log_mean)
                        .map(|(&lp, &lm)| lp.exp() * (lp - lm))
                        .sum::<f64>()
                })
                .sum::<f64>()
                / m;
            kl.exp()
        })
        .collect();
    let k = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / k;
    let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / k).sqrt();
    Ok((mean, std))
}

/// Rows per block of pairwise distances (ADM uses 10000 x 10000 blocks).
const PR_BLOCK: usize = 2048;

/// Squared Euclidean distances `max(|u|^2 - 2 u.v + |v|^2, 0)` between the rows of `u` and
/// `v`, in f32 (ADM's formula; ADM first tries float16 and falls back to float32).
fn sq_distances(u: &Tensor, v: &Tensor) -> Result<Tensor> {
    let nu = u.sqr()?.sum_keepdim(1)?;
    let nv = v.sqr()?.sum_keepdim(1)?.t()?;
    let d = nu
        .broadcast_sub(&(u.matmul(&v.t()?)? * 2.0)?)?
        .broadcast_add(&nv)?;
    Ok(d.relu()?)
}

/// The k-NN radius of every row of `x` (`n` x dim on its device): the squared distance to its
/// k-th nearest neighbour, counting itself as the 0th (ADM's `manifold_radii`, k = 3).
pub fn manifold_radii(x: &Tensor, k: usize) -> Result<Vec<f32>> {
    let n = x.dim(0)?;
    ensure!(
        n > k,
        "k-NN manifolds with k = {k} need at least {} feature vectors, got {n}",
        k + 1
    );
    let mut radii = Vec::with_capacity(n);
    for a in (0..n).step_by(PR_BLOCK) {
        let b = (a + PR_BLOCK).min(n);
        let d = sq_distances(&x.narrow(0, a, b - a)?, x)?;
        let rows: Vec<Vec<f32>> = d.to_vec2()?;
        for mut row in rows {
            let (_, kth, _) = row.select_nth_unstable_by(k, f32::total_cmp);
            radii.push(*kth);
        }
    }
    Ok(radii)
}

/// Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them: precision
/// is the fraction of samples inside some reference point's k-NN ball, recall the fraction of
/// reference points inside some sample's ball. `real` and `fake` are `n` x dim features.
pub fn precision_recall(
    real: &[f32],
    fake: &[f32],
    dim: usize,
    k: usize,
    device: &Device,
) -> Result<(f64, f64)> {
    ensure!(
        dim > 0 && real.len().is_multiple_of(dim) && fake.len().is_multiple_of(dim),
        "feature arrays do not divide into rows of {dim}"
    );
    let (nr, nf) = (real.len() / dim, fake.len() / dim);
    let xr = Tensor::from_slice(real, (nr, dim), device)?;
    let xf = Tensor::from_slice(fake, (nf, dim), device)?;
    let rr = manifold_radii(&xr, k)?;
    let rf = manifold_radii(&xf, k)?;
    let rr_t = Tensor::from_slice(&rr, (1, nr), device)?;
    let rf_t = Tensor::from_slice(&rf, (nf, 1), device)?;
    let mut fake_in = 0usize;
    let mut real_in = Tensor::zeros(nr, DType::F32, device)?;
    for a in (0..nf).step_by(PR_BLOCK) {
        let b = (a + PR_BLOCK).min(nf);
        let d = sq_distances(&xf.narrow(0, a, b - a)?, &xr)?;
        // A sample is precise if it lies in some reference ball (d <= radius of that ref).
        // (Comparisons give u8; reduce in f32, which every backend supports.)
        let inside = d
            .broadcast_le(&rr_t)?
            .to_dtype(DType::F32)?
            .max(D::Minus1)?;
        fake_in += inside.sum_all()?.to_scalar::<f32>()? as usize;
        // A reference point is recalled if it lies in some sample's ball.
        let covered = d
            .broadcast_le(&rf_t.narrow(0, a, b - a)?)?
            .to_dtype(DType::F32)?
            .max(0)?;
        real_in = real_in.maximum(&covered)?;
    }
    let real_in = real_in.sum_all()?.to_scalar::<f32>()? as usize;
    Ok((fake_in as f64 / nf as f64, real_in as f64 / nr as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_statistics_must_be_finite_symmetric_and_positive_semi_definite() {
        let e = |mu: Vec<f64>, s: Vec<f64>| Gaussian::new(mu, s).unwrap_err().to_string();
        assert!(e(vec![f64::NAN, 0.0], vec![1.0, 0.0, 0.0, 1.0]).contains("mu[0]"));
        assert!(e(vec![0.0; 2], vec![1.0, f64::INFINITY, 0.0, 1.0]).contains("sigma[0, 1]"));
        assert!(e(vec![0.0; 2], vec![1.0, 0.5, 0.0, 1.0]).contains("not symmetric"));
        assert!(e(vec![0.0; 2], vec![1.0, 2.0, 2.0, 1.0]).contains("positive semi-definite"));
        assert!(e(vec![0.0; 2], vec![-1.0, 0.0, 0.0, -1.0]).contains("positive semi-definite"));
        // Rank-deficient covariances (fewer samples than dimensions) are PSD.
        Gaussian::new(
            vec![0.0; 3],
            vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        )
        .unwrap();
        Gaussian::new(vec![0.0; 2], vec![0.0; 4]).unwrap();
    }
}
