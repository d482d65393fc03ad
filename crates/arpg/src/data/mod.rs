//! Training data: pre-tokenized images in the layouts users already have, packed into one
//! memory-mapped file, and the UCI digits.

pub mod digits;
pub mod layouts;
pub mod npy;
pub mod pack;
pub mod tokenize;

pub use pack::{PackWriter, Packed};

/// One training sample: a class label and one or more augmented crops of the same length.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub label: u32,
    pub crops: Vec<Vec<u16>>,
}
