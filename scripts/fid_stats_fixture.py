"""Reference values for the FID/sFID/IS/precision-recall statistics (tests/fixtures/fid/stats.npz).

Computes, on fixed random inputs, what ADM's evaluator (guided-diffusion
evaluations/evaluator.py) computes: np.mean / np.cov, the Frechet distance through
scipy.linalg.sqrtm, the Inception Score over splits, and the k-NN (k=3) precision/recall with
float32 squared distances (ADM's fallback path). Written for this repository; run with
`python3 scripts/fid_stats_fixture.py` (numpy, scipy).
"""
import numpy as np
from scipy import linalg

rng = np.random.default_rng(1234)
D = 32


def frechet(mu1, s1, mu2, s2):
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits, bounds):
    x = logits.astype(np.float64)
    x = x - x.max(1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    scores = []
    for a, b in bounds:
        part = p[a:b]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def sqdist(u, v):
    nu = (u * u).sum(1).reshape(-1, 1)
    nv = (v * v).sum(1).reshape(1, -1)
    return np.maximum(nu - 2 * u @ v.T + nv, 0.0).astype(np.float32)


def radii(x, k=3):
    return np.partition(sqdist(x, x), k, axis=1)[:, k]


# Two correlated Gaussian feature sets, N > D (full-rank covariances).
mix_a = rng.normal(size=(D, D)) / np.sqrt(D)
mix_b = mix_a + 0.3 * rng.normal(size=(D, D)) / np.sqrt(D)
feat_a = (rng.normal(size=(300, D)) @ mix_a + 0.5).astype(np.float32)
feat_b = (rng.normal(size=(200, D)) @ mix_b).astype(np.float32)
mu_a, s_a = feat_a.astype(np.float64).mean(0), np.cov(feat_a, rowvar=False)
mu_b, s_b = feat_b.astype(np.float64).mean(0), np.cov(feat_b, rowvar=False)
fid = frechet(mu_a, s_a, mu_b, s_b)

# Rank-deficient: 20 vectors in 32 dimensions (a short run scored against full statistics).
feat_c = (rng.normal(size=(20, D)) @ mix_b).astype(np.float32)
mu_c, s_c = feat_c.astype(np.float64).mean(0), np.cov(feat_c, rowvar=False)
fid_low_rank = frechet(mu_c, s_c, mu_a, s_a)

logits = (rng.normal(size=(120, 100)) * 3.0).astype(np.float32)
is_size50 = inception_score(logits, [(a, min(a + 50, 120)) for a in range(0, 120, 50)])
is_count10 = inception_score(logits, [(i * 120 // 10, (i + 1) * 120 // 10) for i in range(10)])

# Precision/recall: ADM's feature order (ref = a, sample = b).
r_a, r_b = radii(feat_a), radii(feat_b)
d_ba = sqdist(feat_b, feat_a)
precision = float(np.mean(np.any(d_ba <= r_a[None, :], axis=1)))
recall = float(np.mean(np.any(d_ba <= r_b[:, None], axis=0)))

out = dict(
    feat_a=feat_a, feat_b=feat_b, feat_c=feat_c,
    mu_a=mu_a, sigma_a=s_a, mu_b=mu_b, sigma_b=s_b,
    fid=np.array([fid]), fid_low_rank=np.array([fid_low_rank]),
    logits=logits,
    is_size50=np.array(is_size50), is_count10=np.array(is_count10),
    radii_a=r_a, radii_b=r_b,
    precision=np.array([precision]), recall=np.array([recall]),
)
np.savez("tests/fixtures/fid/stats.npz", **out)
print(f"fid {fid:.10f} fid_low_rank {fid_low_rank:.10f}")
print(f"IS size 50 {is_size50}, 10 splits {is_count10}")
print(f"precision {precision} recall {recall}")
