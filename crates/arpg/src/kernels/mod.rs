//! Kernels of our own and the libraries we call directly, each with its fallback.

pub mod cudnn;
