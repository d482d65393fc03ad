//! ARPG: autoregressive image generation with randomized parallel decoding.
//!
//! The pipeline, one module a stage:
//! `tokenizer` (image <-> tokens) -> `model` (logits) -> `sampler` / `editor` / `control`
//! (tokens; `control` makes the conditions a control model's queries read)
//! -> `train` (weights) -> `eval` (scores); `bench` times the stages. `checkpoint` loads and
//! saves weights in the reference's key layout; `config` holds the model and tokenizer
//! configurations; `kernels` the fused CUDA ops, each with its CPU version and backward.
//!
//! Each command of the `arpg` binary is a job struct of plain values in the stage it runs
//! (`sampler::run::SampleJob`, `editor::run::EditJob`, `train::setup::TrainJob`,
//! `eval::sample_fid_run::SampleFidJob`, ...): it checks what it is asked before any weights
//! load, does the work and reports progress through a callback; the binary maps its flags
//! onto it and prints. `zoo` says where models come from and where they run, `reference` the
//! rules of the reference scripts' flags.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod control;
pub mod data;
pub mod device;
pub mod editor;
pub mod eval;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod reference;
pub mod sampler;
pub mod tokenizer;
pub mod train;
pub mod util;
pub mod zoo;

pub use config::{ArpgConfig, VqConfig};
