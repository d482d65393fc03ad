//! Draws the README's pictures with the built-in digits model:
//! `cargo run --release -p arpg --example readme_figures` writes docs/images/*.png.

use anyhow::Result;
use arpg::data::digits;
use arpg::editor::{fill_canvas, inpaint, Canvas};
use arpg::sampler::{random_order, sample, SampleConfig, TokenFilter};
use arpg::tokenizer::{image::make_grid, pixel};
use arpg::zoo::{ModelSpec, DIGITS};
use candle_core::{DType, Device};
use image::{imageops, DynamicImage, RgbImage};
use rand::SeedableRng;
use std::path::Path;

fn rgb(tokens: &[u32], w: usize, h: usize) -> Result<RgbImage> {
    Ok(DynamicImage::ImageLuma8(pixel::decode(tokens, w, h)?).to_rgb8())
}

fn save(img: &RgbImage, name: &str) -> Result<()> {
    let big = imageops::resize(
        img,
        img.width() * 6,
        img.height() * 6,
        imageops::FilterType::Nearest,
    );
    std::fs::create_dir_all("docs/images")?;
    big.save(Path::new("docs/images").join(name))?;
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let model = ModelSpec {
        model: Some(DIGITS.into()),
        ..Default::default()
    }
    .load(DType::F32, &dev)?;
    let sc = SampleConfig {
        steps: 16,
        cfg: 3.0,
        cfg_schedule: "constant".parse()?,
        filter: TokenFilter::default(),
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (_, test) = digits::split(&digits::load_csv_gz(Path::new(
        "data/digits/digits.csv.gz",
    ))?);

    // Samples: one row per class.
    let classes: Vec<usize> = (0..10).flat_map(|c| std::iter::repeat_n(c, 8)).collect();
    let all: Vec<usize> = (0..64).collect();
    let orders: Vec<Vec<usize>> = classes
        .iter()
        .map(|_| random_order(&all, &mut rng))
        .collect();
    let toks = sample(&model, &classes, &orders, &sc, &mut rng)?;
    let imgs: Vec<RgbImage> = toks.iter().map(|t| rgb(t, 8, 8)).collect::<Result<_>>()?;
    save(&make_grid(&imgs, 8, 1), "samples.png")?;

    // Inpainting: each row = held-out digit, its upper half, then 5 completions of the lower half.
    let mut tiles = Vec::new();
    for d in test.iter().take(6) {
        let t: Vec<u32> = d.pixels.iter().map(|&v| v as u32).collect();
        let regen: Vec<bool> = (0..64).map(|i| i >= 32).collect();
        tiles.push(rgb(&t, 8, 8)?);
        let masked: Vec<u32> = t
            .iter()
            .enumerate()
            .map(|(i, &v)| if i >= 32 { 0 } else { v })
            .collect();
        tiles.push(rgb(&masked, 8, 8)?);
        let canvas = Canvas::from_tokens(8, 8, &t, &regen)?;
        for o in inpaint(&model, &canvas, d.label as usize, 5, &sc, None, &mut rng)? {
            tiles.push(rgb(&o, 8, 8)?);
        }
    }
    save(&make_grid(&tiles, 7, 1), "inpaint.png")?;

    // Outpainting: each held-out digit extended by 8 pixels left and right (8x8 -> 24x8).
    let mut rows = Vec::new();
    for d in test.iter().skip(6).take(4) {
        let t: Vec<u32> = d.pixels.iter().map(|&v| v as u32).collect();
        let canvas = Canvas::from_tokens(8, 8, &t, &[false; 64])?.pad(0, 0, 8, 8);
        let filled = fill_canvas(&model, &canvas, d.label as usize, &sc, &mut rng)?;
        rows.push(rgb(&filled.tokens().unwrap(), 24, 8)?);
    }
    save(&make_grid(&rows, 1, 1), "outpaint.png")?;

    // Controllable generation: each row = a held-out digit, its stroke mask (the condition),
    // then 6 samples of `digits-sketch` given that mask and the digit's class.
    let sketch_model = ModelSpec {
        model: Some(arpg::zoo::DIGITS_SKETCH.into()),
        ..Default::default()
    }
    .load(DType::F32, &dev)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut tiles = Vec::new();
    for d in test.iter().skip(10).take(6) {
        let sk = arpg::control::digit_sketch(&d.pixels);
        let cond = arpg::control::sketch_tensor(&[sk])?;
        let classes = vec![d.label as usize; 6];
        let known = vec![vec![]; 6];
        let orders: Vec<Vec<usize>> = classes
            .iter()
            .map(|_| random_order(&all, &mut rng))
            .collect();
        let req = arpg::sampler::Request {
            classes: &classes,
            known: &known,
            orders: &orders,
            condition: Some(arpg::sampler::Condition {
                images: &cond,
                guide: true,
            }),
        };
        tiles.push(rgb(&d.pixels.map(|v| v as u32), 8, 8)?);
        tiles.push(
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(8, 8, sk.to_vec()).unwrap())
                .to_rgb8(),
        );
        for o in arpg::sampler::decode(&sketch_model, &req, &sc, &mut rng)? {
            tiles.push(rgb(&o, 8, 8)?);
        }
    }
    save(&make_grid(&tiles, 8, 1), "sketch.png")?;
    println!("wrote docs/images/{{samples,inpaint,outpaint,sketch}}.png");
    Ok(())
}
