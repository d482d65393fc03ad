//! Evaluation: how good are generated samples.
//!
//! `digits` scores the digits model; `parity` is the reference-fixture report. The rest is
//! ADM's ImageNet protocol: `inception` (the FID InceptionV3), `stats` (FID, sFID, IS,
//! precision/recall), `npz` (ADM's `.npz` sample and reference batches), `fid` (those scores
//! of a sample batch against a reference batch), `sample_fid` (the sharded, resumable
//! sampling of N images into such a `.npz`), `sample_fid_run` (one process's run of it: ranks,
//! resuming, the archive).

pub mod digits;
pub mod fid;
pub mod inception;
pub mod npz;
pub mod parity;
pub mod sample_fid;
pub mod sample_fid_run;
pub mod stats;
