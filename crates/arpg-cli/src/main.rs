//! `arpg`: sample, encode and decode images with ARPG models.

mod args;
mod bench;
mod edit;
mod eval;
mod fid;
mod launch;
mod parity;
mod reference;
mod sample;
mod serve;
mod tokens;
mod train;

use clap::{Parser, Subcommand};

// Tensor ops allocate and free large buffers constantly; mimalloc reuses them instead of
// paying page faults for fresh mmaps on every op (measured: faster CPU training steps).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "arpg",
    version,
    about = "ARPG: autoregressive image generation with randomized parallel decoding"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample class-conditional images.
    Sample(sample::SampleArgs),
    /// Decode token grids (JSON) to images with the VQ tokenizer.
    Decode(tokens::DecodeArgs),
    /// Encode images to token grids (JSON) with the VQ tokenizer.
    Encode(tokens::EncodeArgs),
    /// Train an ARPG model on packed token data (the paper's recipe).
    Train(train::TrainArgs),
    /// Pack pre-tokenized data (paper or LlamaGen layout, or the UCI digits) into one file.
    Pack(train::PackArgs),
    /// Regenerate the masked part of an image (zero-shot inpainting / class editing).
    Inpaint(edit::InpaintArgs),
    /// Extend an image beyond its borders (zero-shot outpainting).
    Outpaint(edit::OutpaintArgs),
    /// Time sampling (and VQ decoding, training) on random or real weights.
    Bench(bench::BenchArgs),
    /// Compare this build with the reference fixtures on a device and dtype.
    CheckParity(parity::ParityArgs),
    /// Encode a folder-per-class image tree into VQ codes (the paper's .npy layout), resumable.
    Tokenize(train::TokenizeArgs),
    /// Draw the loss, learning-rate and gradient-norm curves of a training log.
    Plot(train::PlotArgs),
    /// Score a digits model: class accuracy by a k-NN judge and the copy rate.
    EvalDigits(eval::EvalDigitsArgs),
    /// Sample N images for FID (ADM's .npz), sharded over GPUs, resumable.
    SampleFid(fid::SampleFidArgs),
    /// FID, sFID, Inception Score, precision and recall of samples against a reference batch.
    Eval(fid::EvalArgs),
    /// Serve a model over HTTP: JSON API (generate, inpaint, outpaint), batching, a web page.
    Serve(serve::ServeArgs),
    /// A bounded load test against `arpg serve` on loopback.
    LoadTest(serve::LoadTestArgs),
}

fn main() {
    // candle's CPU worker pool spins while waiting; next to gemm's own threads on a small
    // machine that halves throughput (measured 2.2x faster training with 1 on 2 cores).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    {
        use tracing_subscriber::prelude::*;
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::EnvFilter::from_default_env());
        // ARPG_PROFILE: per-part times of the library's spans (`arpg bench` prints them).
        let profile = arpg::util::profiling().then(arpg::util::profile_layer);
        tracing_subscriber::registry()
            .with(log)
            .with(profile)
            .init();
    }
    // First Ctrl-C: finish the unit of work in hand, write what is done, stop. Second: exit.
    let _ = ctrlc::set_handler(|| {
        if arpg::util::interrupted() {
            arpg::util::interrupt_again();
            return;
        }
        eprintln!(
            "\ninterrupted: finishing the current batch, then stopping (Ctrl-C again to abort)"
        );
        arpg::util::interrupt();
    });
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sample(a) => sample::run(a),
        Command::Decode(a) => tokens::decode(a),
        Command::Encode(a) => tokens::encode(a),
        Command::Train(a) => train::train(a),
        Command::Pack(a) => train::pack(a),
        Command::Plot(a) => train::plot(a),
        Command::Tokenize(a) => train::tokenize(a),
        Command::EvalDigits(a) => eval::run(a),
        Command::SampleFid(a) => fid::run_sample(a),
        Command::Eval(a) => fid::run_eval(a),
        Command::Bench(a) => bench::run(a),
        Command::CheckParity(a) => parity::run(a),
        Command::Inpaint(a) => edit::run_inpaint(a),
        Command::Outpaint(a) => edit::run_outpaint(a),
        Command::Serve(a) => serve::run(a),
        Command::LoadTest(a) => serve::load_test(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    if arpg::util::interrupted() {
        std::process::exit(130);
    }
}
