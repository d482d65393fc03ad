//! Evaluation: how good are generated samples.

pub mod digits;
pub mod parity;
