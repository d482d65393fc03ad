//! The built-in digits model against the bar, judged as `arpg eval-digits` judges
//! (3-NN on raw pixels trained on the training digits; 16 steps, CFG 4 constant).

use arpg::data::digits::{self, Digit};
use arpg::eval::digits::{report, DigitsReport};
use arpg::model::Arpg;
use arpg::sampler::{decode, random_order, Request, SampleConfig};
use arpg::zoo::{ModelSpec, DIGITS};
use candle_core::{DType, Device};
use rand::SeedableRng;
use std::path::Path;

fn setup() -> (Arpg, Vec<Digit>, Vec<Digit>) {
    let model = ModelSpec {
        model: Some(DIGITS.into()),
        ..Default::default()
    }
    .load(DType::F32, &Device::Cpu)
    .unwrap();
    let csv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/digits/digits.csv.gz"
    );
    let (train, test) = digits::split(&digits::load_csv_gz(Path::new(csv)).unwrap());
    (model, train, test)
}

/// Decode `classes` with `known` tokens in random orders of the other cells, then score.
fn run(
    model: &Arpg,
    classes: &[usize],
    known: &[Vec<(usize, u32)>],
    train: &[Digit],
    test: &[Digit],
) -> DigitsReport {
    let sc = SampleConfig {
        steps: 16,
        cfg: 4.0,
        cfg_schedule: "constant".parse().unwrap(),
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut samples = Vec::new();
    for (cs, ks) in classes.chunks(100).zip(known.chunks(100)) {
        let orders: Vec<Vec<usize>> = ks
            .iter()
            .map(|k| {
                let free: Vec<usize> = (0..64).filter(|p| k.iter().all(|e| e.0 != *p)).collect();
                random_order(&free, &mut rng)
            })
            .collect();
        let req = Request {
            classes: cs,
            known: ks,
            orders: &orders,
            condition: None,
        };
        for (c, t) in cs.iter().zip(decode(model, &req, &sc, &mut rng).unwrap()) {
            let mut px = [0u8; 64];
            for (p, v) in px.iter_mut().zip(t) {
                *p = v as u8;
            }
            samples.push((*c as u32, px));
        }
    }
    report(&samples, train, test)
}

#[test]
fn inpainted_held_out_digits_are_recognised_as_their_class() {
    let (model, train, test) = setup();
    let classes: Vec<usize> = test.iter().map(|d| d.label as usize).collect();
    let known: Vec<Vec<(usize, u32)>> = test
        .iter()
        .map(|d| (0..32).map(|p| (p, d.pixels[p] as u32)).collect())
        .collect();
    let r = run(&model, &classes, &known, &train, &test);
    assert_eq!(r.samples, 360);
    assert!(r.class_accuracy >= 0.95, "{r:?}");
    assert!(r.copy_rate < 0.05, "{r:?}");
}

#[test]
fn sampled_digits_are_the_requested_class_and_not_copies() {
    let (model, train, test) = setup();
    let classes: Vec<usize> = (0..10).flat_map(|c| std::iter::repeat_n(c, 20)).collect();
    let known = vec![vec![]; classes.len()];
    let r = run(&model, &classes, &known, &train, &test);
    assert!(r.class_accuracy >= 0.9, "{r:?}");
    assert!(r.copy_rate < 0.05, "{r:?}");
    assert!(r.per_class_accuracy.iter().all(|&a| a >= 0.75), "{r:?}");
}

/// The shipped `digits-sketch` model on every held-out digit's stroke mask: its samples keep
/// the sketch (IoU with their own strokes) and the class, and are not copies; the class-only
/// `digits` model, given no sketch, is the baseline.
#[test]
fn the_sketch_model_keeps_held_out_sketches_and_their_class() {
    use arpg::eval::digits::{run_task, DigitsTask};
    let (plain, train, test) = setup();
    let sketch = ModelSpec {
        model: Some(arpg::zoo::DIGITS_SKETCH.into()),
        ..Default::default()
    }
    .load(DType::F32, &Device::Cpu)
    .unwrap();
    let sc = SampleConfig {
        steps: 16,
        cfg: 4.0,
        cfg_schedule: "constant".parse().unwrap(),
        ..Default::default()
    };
    let score = |m: &Arpg| {
        run_task(
            m,
            DigitsTask::Sketch,
            &train,
            &test,
            &sc,
            120,
            0,
            &mut |_| {},
        )
        .unwrap()
    };
    let (r, base) = (score(&sketch), score(&plain));
    eprintln!("digits-sketch: {r:?}\ndigits (no sketch): {base:?}");
    assert_eq!(r.samples, test.len());
    let (iou, base_iou) = (r.sketch_iou.unwrap(), base.sketch_iou.unwrap());
    assert!(iou >= 0.8, "IoU {iou}");
    assert!(base_iou < iou - 0.2, "baseline IoU {base_iou} vs {iou}");
    assert!(r.class_accuracy >= 0.9, "{r:?}");
    assert!(r.copy_rate < 0.05, "{r:?}");
}
