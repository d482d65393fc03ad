//! Controllable generation in the library: the control encoder in the model, its training
//! (gradients, checkpoints, fine-tuning from a class-only model) and conditioned decoding.

use arpg::config::{ControlConfig, ControlQuery};
use arpg::data::{PackWriter, Packed, Sample};
use arpg::model::{Arpg, Mode, Positions};
use arpg::sampler::{decode, random_order, Condition, DecodeShape, Request, SampleConfig};
use arpg::train::{TrainConfig, Trainer};
use arpg::ArpgConfig;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// A 4x4-token model whose condition is an 8x8 single-channel image (2x2 pixels per cell).
fn tiny(query: ControlQuery, dropout: f64) -> ArpgConfig {
    ArpgConfig {
        dim: 32,
        n_layer: 2,
        n_head: 2,
        vocab_size: 11,
        num_classes: 3,
        block_size: 16,
        multiple_of: 16,
        norm_eps: 1e-5,
        rope_base: 10000.0,
        ffn_dim_multiplier: None,
        cls_token_num: 1,
        abs_pos_embed: true,
        control: Some(ControlConfig {
            channels: 1,
            patch: 2,
            layers: 1,
            query,
            dropout,
        }),
    }
}

/// Samples whose tokens follow their condition: a cell's token is 9 or 10 where its patch is
/// bright, else 0..3 (so a model can learn the condition in a few steps).
fn pack(dir: &std::path::Path, n: usize) -> Packed {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut w = PackWriter::new();
    for i in 0..n {
        let bright: Vec<bool> = (0..16).map(|_| rng.random_bool(0.5)).collect();
        let tokens: Vec<u16> = bright
            .iter()
            .map(|&b| {
                if b {
                    9 + rng.random_range(0..2)
                } else {
                    rng.random_range(0..4)
                }
            })
            .collect();
        let mut img = vec![0u8; 64];
        for (c, &b) in bright.iter().enumerate() {
            let (gy, gx) = (c / 4, c % 4);
            for dy in 0..2 {
                for dx in 0..2 {
                    img[(gy * 2 + dy) * 8 + gx * 2 + dx] = if b { 255 } else { 0 };
                }
            }
        }
        let s = Sample {
            label: (i % 3) as u32,
            crops: vec![tokens],
        };
        w.push_with_conditions(&s, (1, 8, 8), &[img]).unwrap();
    }
    let p = dir.join("control.pack");
    w.write(&p).unwrap();
    Packed::open(&p).unwrap()
}

/// A trainer with its zero-initialised head and control output randomised, so that every
/// weight (the encoder's too) moves the loss.
fn trainer(cfg: &ArpgConfig, dtype: DType, tc: &TrainConfig) -> Trainer {
    let tr = Trainer::new(cfg, tc, dtype, &Device::Cpu).unwrap();
    for (name, v) in tr.parameters() {
        if name == "head.weight" || name == "control.out.weight" {
            v.set(&Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    tr
}

#[test]
fn the_encoder_is_declared_in_the_official_key_style_and_counted() {
    let cfg = tiny(ControlQuery::Add, 0.1);
    let names: Vec<String> = cfg
        .parameter_shapes()
        .unwrap()
        .into_iter()
        .map(|p| p.0)
        .collect();
    for n in [
        "control.patch_embed.weight",
        "control.pos_embed.weight",
        "control.layers.0.attn.to_q.weight",
        "control.layers.0.ffn.w1.weight",
        "control.layers.0.attn_norm.weight",
        "control.norm.weight",
        "control.out.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    let by_shapes: usize = cfg
        .parameter_shapes()
        .unwrap()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(cfg.checked_num_parameters(), Some(by_shapes));
    let plain = ArpgConfig {
        control: None,
        ..cfg.clone()
    };
    assert!(plain.num_parameters() < by_shapes);
    // The config round-trips through JSON; a bad block is refused by name.
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<ArpgConfig>(&json).unwrap(), cfg);
    let mut bad = cfg.clone();
    bad.control.as_mut().unwrap().channels = 2;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("control.channels"));
}

#[test]
fn every_parameter_of_a_control_model_receives_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let data = pack(dir.path(), 12);
    for q in [ControlQuery::Add, ControlQuery::Replace] {
        let mut tr = trainer(&tiny(q, 0.3), DType::F32, &TrainConfig::default());
        let batch = tr.make_batch(&data, &(0..12).collect::<Vec<_>>()).unwrap();
        let keep = batch.control.as_ref().unwrap().1.to_vec1::<f32>().unwrap();
        assert!(keep.contains(&0.0) && keep.contains(&1.0), "{keep:?}");
        let grads = tr.loss(&batch).unwrap().backward().unwrap();
        for (name, v) in tr.parameters() {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{q:?} {name}: {norm}");
        }
    }
}

#[test]
fn encoder_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let data = pack(dir.path(), 4);
    let tc = TrainConfig {
        dropout: 0.0,
        class_dropout: 0.0,
        ..Default::default()
    };
    for q in [ControlQuery::Add, ControlQuery::Replace] {
        let mut tr = trainer(&tiny(q, 0.0), DType::F64, &tc);
        let batch = tr.make_batch(&data, &[0, 1, 2, 3]).unwrap();
        let grads = tr.loss(&batch).unwrap().backward().unwrap();
        let params: Vec<_> = tr
            .parameters()
            .filter(|(n, _)| n.starts_with("control.") || *n == "embeddings.weight")
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for (name, v) in &params {
            let g = grads.get(v).unwrap().flatten_all().unwrap();
            let g = g.to_vec1::<f32>().unwrap();
            let orig = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for _ in 0..3 {
                // The mask token's row (11) carries the replace mode's subtraction.
                let i = match name.as_str() {
                    "embeddings.weight" => 11 * 32 + rng.random_range(0..32),
                    _ => rng.random_range(0..orig.len()),
                };
                let eps = 1e-3f32;
                let mut at = |delta: f32| -> f64 {
                    let mut w = orig.clone();
                    w[i] += delta;
                    v.set(&Tensor::from_vec(w, v.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    tr.loss(&batch).unwrap().to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                v.set(&Tensor::from_vec(orig.clone(), v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let an = g[i] as f64;
                assert!(
                    (fd - an).abs() <= 2e-3 * an.abs().max(fd.abs()) + 2e-5,
                    "{q:?} {name}[{i}]: analytic {an}, finite difference {fd}"
                );
            }
        }
    }
}

/// Teacher-forced logits of one sequence with a query table (or mask queries).
fn logits(m: &Arpg, table: Option<&Tensor>) -> Vec<f32> {
    let dev = Device::Cpu;
    let toks = Tensor::new(&[[m.config().class_token(1), 4, 7, 2]], &dev).unwrap();
    let keys = Tensor::new(&[[0u32, 3, 8, 12]], &dev).unwrap();
    let queries = Tensor::new(&[[3u32, 8, 12, 16]], &dev).unwrap();
    let pos = Positions {
        keys: &keys,
        queries: &queries,
        control: table,
    };
    m.forward(&toks, pos, &mut Mode::inference())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_fresh_encoder_starts_as_the_class_only_model_and_the_null_condition_is_the_mask() {
    let cond = Tensor::rand(0f32, 1.0, (1, 1, 8, 8), &Device::Cpu).unwrap();
    let one = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    let zero = Tensor::new(&[0f32], &Device::Cpu).unwrap();
    // Add mode, as initialised (zero output projection): the condition changes nothing.
    let tr = Trainer::new(
        &tiny(ControlQuery::Add, 0.1),
        &Default::default(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for (n, v) in tr.parameters() {
        if n == "head.weight" {
            v.set(&Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let m = tr.model().unwrap();
    let plain = logits(&m, None);
    let t = m
        .control_queries(&cond, Some(&one), &mut Mode::inference())
        .unwrap();
    assert_eq!(t.dims(), &[1, 17, 32]);
    assert!(max_diff(&plain, &logits(&m, Some(&t))) < 1e-6);
    // Trained (a random output projection) it does; dropped (keep 0), it is the mask query.
    let tr = trainer(
        &tiny(ControlQuery::Add, 0.1),
        DType::F32,
        &Default::default(),
    );
    let m = tr.model().unwrap();
    let plain = logits(&m, None);
    let kept = m
        .control_queries(&cond, Some(&one), &mut Mode::inference())
        .unwrap();
    let dropped = m
        .control_queries(&cond, Some(&zero), &mut Mode::inference())
        .unwrap();
    assert!(max_diff(&plain, &logits(&m, Some(&kept))) > 1e-3);
    assert!(max_diff(&plain, &logits(&m, Some(&dropped))) < 1e-6);
    // Replace mode swaps the mask token out: dropped is again the plain model.
    let tr = trainer(
        &tiny(ControlQuery::Replace, 0.1),
        DType::F32,
        &Default::default(),
    );
    let m = tr.model().unwrap();
    let dropped = m
        .control_queries(&cond, Some(&zero), &mut Mode::inference())
        .unwrap();
    assert!(max_diff(&logits(&m, None), &logits(&m, Some(&dropped))) < 1e-5);
    // A condition of the wrong size is refused, naming the shapes.
    let bad = Tensor::zeros((1, 1, 6, 6), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .control_queries(&bad, None, &mut Mode::inference())
        .unwrap_err();
    assert!(e.to_string().contains("(1, 8, 8)"), "{e}");
}

#[test]
fn checkpoints_keep_the_encoder_and_fine_tuning_starts_from_a_class_only_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(ControlQuery::Add, 0.1);
    let plain_cfg = ArpgConfig {
        control: None,
        ..cfg.clone()
    };
    // A class-only model's inference weights ...
    let base = trainer(&plain_cfg, DType::F32, &Default::default());
    let base_path = dir.path().join("base.safetensors");
    arpg::checkpoint::save_safetensors_atomic(&base.export_weights(), &base_path).unwrap();
    // ... start a control model: shared weights loaded, the encoder fresh.
    let mut tr = Trainer::new(&cfg, &Default::default(), DType::F32, &Device::Cpu).unwrap();
    let fresh = tr.init_from(&base_path).unwrap();
    assert!(!fresh.is_empty() && fresh.iter().all(|n| n.starts_with("control.")));
    let cond = Tensor::rand(0f32, 1.0, (1, 1, 8, 8), &Device::Cpu).unwrap();
    let one = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    let m = tr.model().unwrap();
    let t = m
        .control_queries(&cond, Some(&one), &mut Mode::inference())
        .unwrap();
    let b = base.model().unwrap();
    assert!(max_diff(&logits(&b, None), &logits(&m, Some(&t))) < 1e-6);
    // A checkpoint of another model is refused by name.
    let other = ArpgConfig {
        dim: 64,
        ..plain_cfg.clone()
    };
    let o = Trainer::new(&other, &Default::default(), DType::F32, &Device::Cpu).unwrap();
    let other_path = dir.path().join("other.safetensors");
    arpg::checkpoint::save_safetensors_atomic(&o.export_weights(), &other_path).unwrap();
    let e = tr.init_from(&other_path).unwrap_err().to_string();
    assert!(
        e.contains("other.safetensors") && e.contains("shape"),
        "{e}"
    );
    // The encoder's weights are saved and load back strictly into the same logits.
    let tr = trainer(&cfg, DType::F32, &Default::default());
    let path = dir.path().join("control.safetensors");
    arpg::checkpoint::save_safetensors_atomic(&tr.export_weights(), &path).unwrap();
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let spec = arpg::zoo::ModelSpec {
        config: Some(cfg_path),
        weights: Some(path),
        ..Default::default()
    };
    let loaded = spec.load(DType::F32, &Device::Cpu).unwrap();
    let t1 = tr
        .model()
        .unwrap()
        .control_queries(&cond, Some(&one), &mut Mode::inference())
        .unwrap();
    let t2 = loaded
        .control_queries(&cond, Some(&one), &mut Mode::inference())
        .unwrap();
    assert!(
        max_diff(
            &logits(&tr.model().unwrap(), Some(&t1)),
            &logits(&loaded, Some(&t2))
        ) < 1e-6
    );
    // Without the encoder's weights the checkpoint does not load as a control model.
    let spec = arpg::zoo::ModelSpec {
        weights: Some(base_path),
        ..spec
    };
    assert!(spec.load(DType::F32, &Device::Cpu).is_err());
}

fn sc(cfg: f32) -> SampleConfig {
    SampleConfig {
        steps: 4,
        cfg,
        ..Default::default()
    }
}

#[test]
fn conditioned_decoding_is_checked_deterministic_and_steered() {
    let dir = tempfile::tempdir().unwrap();
    let data = pack(dir.path(), 96);
    // A few hundred steps teach the tiny model to follow its condition.
    let tc = TrainConfig {
        batch_size: 32,
        steps: 150,
        lr: 3e-3,
        min_lr: 3e-4,
        dropout: 0.0,
        ..Default::default()
    };
    let mut tr =
        Trainer::new(&tiny(ControlQuery::Add, 0.1), &tc, DType::F32, &Device::Cpu).unwrap();
    while tr.step < tc.steps {
        tr.train_step(&data).unwrap();
    }
    let m = tr.model().unwrap();
    // Left half bright, right half dark.
    let img: Vec<f32> = (0..64).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect();
    let cond = Tensor::from_vec(img, (1, 1, 8, 8), &Device::Cpu).unwrap();
    let n = 8;
    let classes = vec![1usize; n];
    let known = vec![vec![]; n];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let orders: Vec<Vec<usize>> = (0..n)
        .map(|_| random_order(&(0..16).collect::<Vec<_>>(), &mut rng))
        .collect();
    let run = |c: Option<Condition>, seed: u64, cfg: f32| {
        let req = Request {
            classes: &classes,
            known: &known,
            orders: &orders,
            condition: c,
        };
        decode(
            &m,
            &req,
            &sc(cfg),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        )
        .unwrap()
    };
    let follows = |toks: &[Vec<u32>]| {
        let mut ok = 0;
        for t in toks {
            for (c, &v) in t.iter().enumerate() {
                ok += ((c % 4 < 2) == (v >= 9)) as usize;
            }
        }
        ok as f64 / (toks.len() * 16) as f64
    };
    for guide in [true, false] {
        let c = Some(Condition {
            images: &cond,
            guide,
        });
        let a = run(c, 1, 3.0);
        assert_eq!(a, run(c, 1, 3.0), "same seed, same tokens");
        assert!(follows(&a) > 0.9, "guide {guide}: {}", follows(&a));
    }
    let free = run(None, 1, 3.0);
    assert!(
        follows(&free) < 0.75,
        "without a condition: {}",
        follows(&free)
    );
    // Editing composes with control: known cells stay, the rest follow the condition.
    let canvas = arpg::editor::Canvas::from_tokens(
        4,
        4,
        &[10, 10, 0, 0].repeat(4),
        &[
            false, false, false, false, true, true, true, true, true, true, true, true, true, true,
            true, true,
        ],
    )
    .unwrap();
    let out = arpg::editor::inpaint(
        &m,
        &canvas,
        1,
        4,
        &sc(3.0),
        Some(Condition {
            images: &cond,
            guide: true,
        }),
        &mut rng,
    )
    .unwrap();
    for t in &out {
        assert_eq!(&t[..4], &[10, 10, 0, 0]);
    }
    assert!(follows(&out) > 0.9, "{}", follows(&out));
}

#[test]
fn conditions_are_validated_once_with_clear_errors() {
    let cond = Tensor::zeros((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let known = vec![vec![]; 2];
    let orders = vec![(0..16).collect::<Vec<_>>(); 2];
    let check = |cfg: &ArpgConfig, c: Option<Condition>| {
        Request {
            classes: &[0, 1],
            known: &known,
            orders: &orders,
            condition: c,
        }
        .validate(DecodeShape::of_config(cfg), &sc(3.0))
        .err()
        .map(|e| e.to_string())
    };
    let with = |images| {
        Some(Condition {
            images,
            guide: false,
        })
    };
    let plain = ArpgConfig {
        control: None,
        ..tiny(ControlQuery::Add, 0.1)
    };
    assert!(check(&plain, with(&cond))
        .unwrap()
        .contains("no control encoder"));
    assert!(check(&plain, None).is_none());
    let needs = tiny(ControlQuery::Add, 0.0);
    assert!(check(&needs, None)
        .unwrap()
        .contains("without condition dropout"));
    assert!(check(&needs, with(&cond)).is_none());
    let guided = Some(Condition {
        images: &cond,
        guide: true,
    });
    assert!(check(&needs, guided)
        .unwrap()
        .contains("--control-guidance class"));
    let ok = tiny(ControlQuery::Add, 0.1);
    assert!(check(&ok, None).is_none() && check(&ok, guided).is_none());
    let wrong = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(check(&ok, with(&wrong))
        .unwrap()
        .contains("1 channel(s), 8x8"));
    let three = Tensor::zeros((3, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(check(&ok, with(&three)).unwrap().contains("[2 or 1"));
    let big = (Tensor::ones((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap() * 2.0).unwrap();
    assert!(check(&ok, with(&big)).unwrap().contains("[0, 1]"));
    let nan = (Tensor::zeros((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap() / 0.0).unwrap();
    assert!(check(&ok, with(&nan)).is_some());
}
