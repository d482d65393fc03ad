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
use indicatif::{ProgressBar, ProgressStyle};

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
    arpg::util::init_process();
    let _ = ctrlc::set_handler(arpg::util::on_ctrl_c);
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

/// Every bar's layout: `HEAD {pos}/{len} UNIT [{elapsed_precise}<{eta_precise}]TAIL`.
fn style(head: &str, unit: &str, tail: &str) -> ProgressStyle {
    let t = format!("{head} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}]{tail}");
    ProgressStyle::with_template(&t).expect("a valid template")
}

/// A progress bar of `len` `unit`s.
fn bar(len: usize, unit: &str, tail: &str) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(style("{bar:40}", unit, tail))
}

/// A bar drawn from the library's `(done, total)` reports, made on the first, so that its
/// clock starts with the work.
struct Bar {
    pb: Option<ProgressBar>,
    style: ProgressStyle,
    message: String,
}

impl Bar {
    fn new(unit: &str, tail: &str) -> Self {
        Self::with_head("{bar:40}", unit, tail)
    }

    fn with_head(head: &str, unit: &str, tail: &str) -> Self {
        let (style, message) = (style(head, unit, tail), String::new());
        Bar {
            pb: None,
            style,
            message,
        }
    }

    fn with_message(self, message: String) -> Self {
        Bar { message, ..self }
    }

    fn set(&mut self, done: usize, total: usize) {
        let pb = self.pb.get_or_insert_with(|| {
            let pb = ProgressBar::new(total as u64).with_style(self.style.clone());
            pb.set_message(self.message.clone());
            pb
        });
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    }

    fn finish(&mut self) {
        self.pb.take().inspect(ProgressBar::finish_and_clear);
    }

    /// Leaves the bar where it stopped (a run cut short).
    fn abandon(&mut self) {
        self.pb.take().inspect(ProgressBar::abandon);
    }
}
