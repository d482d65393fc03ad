//! Every parser of a file the user hands us, fed mutated and truncated versions of valid files:
//! an error or a value, never a panic, an abort or an endless read (issue #17).

use arpg::checkpoint::{StateDict, Weights};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

/// Byte flips at (position, xor) and an optional cut, applied to `valid`.
fn mutate(valid: &[u8], flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut b = valid.to_vec();
    if !b.is_empty() {
        for &(i, x) in flips {
            let n = b.len();
            b[i % n] ^= x;
        }
    }
    if let Some(c) = cut {
        b.truncate(c % (valid.len() + 1));
    }
    b
}

/// Flips biased to the start of the file, where the headers are.
fn mutations() -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        prop::collection::vec(
            prop_oneof![(0usize..128, any::<u8>()), (any::<usize>(), any::<u8>())],
            0..6,
        ),
        prop::option::of(any::<usize>()),
    )
}

fn with_file<T>(bytes: &[u8], name: &str, f: impl FnOnce(&Path) -> T) -> T {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    f(&p)
}

fn valid_npy() -> Vec<u8> {
    let body: Vec<u8> = (0..24u16).flat_map(|x| x.to_le_bytes()).collect();
    arpg::data::npy::to_bytes("<u2", &[1, 2, 12], &body)
}

fn valid_npz() -> Vec<u8> {
    use arpg::eval::npz::{write, Entry};
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.npz");
    let imgs = vec![5u8; 2 * 3 * 3 * 3];
    let mu = [0.5f64, 1.0];
    let sigma = [1.0f64, 0.0, 0.0, 1.0];
    write(
        &p,
        vec![
            Entry::u8s("arr_0", &[2, 3, 3, 3], &imgs),
            Entry::f64s("mu", &[2], &mu),
            Entry::f64s("sigma", &[2, 2], &sigma),
        ],
    )
    .unwrap();
    std::fs::read(p).unwrap()
}

fn valid_pack() -> Vec<u8> {
    use arpg::data::{PackWriter, Sample};
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("d.pack");
    let mut w = PackWriter::new();
    w.push(&Sample {
        label: 3,
        crops: vec![vec![1, 2, 3, 4]],
    })
    .unwrap();
    w.push(&Sample {
        label: 1,
        crops: vec![vec![5, 6, 7, 8], vec![0, 0, 1, 1]],
    })
    .unwrap();
    w.write(&p).unwrap();
    std::fs::read(p).unwrap()
}

fn valid_training_checkpoint() -> Vec<u8> {
    use arpg::train::{TrainConfig, Trainer};
    let cfg: arpg::ArpgConfig = serde_json::from_str(
        r#"{"dim":8,"n_layer":2,"n_head":2,"vocab_size":5,"num_classes":2,"block_size":4,"multiple_of":8}"#,
    )
    .unwrap();
    let tc = TrainConfig {
        batch_size: 2,
        steps: 4,
        ..Default::default()
    };
    let tr = Trainer::new(
        &cfg,
        &tc,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.safetensors");
    tr.save(&p).unwrap();
    std::fs::read(p).unwrap()
}

fn digits_gz(text: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(text).unwrap();
    e.finish().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn npy_readers((flips, cut) in mutations()) {
        let b = mutate(&valid_npy(), &flips, cut);
        let _ = arpg::data::npy::parse(&b);
        let _ = arpg::data::npy::read_header(&mut &b[..]);
        with_file(&b, "a.npy", |p| {
            let _ = arpg::data::npy::read(p);
            let _ = arpg::tokenizer::image::read_npy_f32(p);
            let _ = arpg::eval::npz::npy_body(p);
            let _ = arpg::data::layouts::crops_from_npy(p, 1 << 16);
        });
    }

    #[test]
    fn npz_readers((flips, cut) in mutations()) {
        let b = mutate(&valid_npz(), &flips, cut);
        with_file(&b, "a.npz", |p| {
            let _ = arpg::eval::npz::names(p);
            if let Ok(mut r) = arpg::eval::npz::ImageReader::open(p, "arr_0") {
                while let Ok(Some(_)) = r.next_batch(1) {}
            }
            let _ = arpg::eval::npz::read_floats(p, "sigma", &[Some(2), Some(2)]);
            let _ = arpg::eval::npz::read_array(p, "mu");
        });
    }

    #[test]
    fn packed_data((flips, cut) in mutations()) {
        let b = mutate(&valid_pack(), &flips, cut);
        with_file(&b, "d.pack", |p| {
            if let Ok(d) = arpg::data::Packed::open(p) {
                for i in 0..d.len() {
                    let _ = d.label(i);
                    for c in 0..d.n_crops(i) {
                        let _ = d.tokens(i, c);
                    }
                }
            }
        });
    }

    #[test]
    fn checkpoints((flips, cut) in mutations(), pt in any::<bool>()) {
        let (valid, name) = match pt {
            true => (std::fs::read(fixture("fid/zip.pth")).unwrap(), "w.pt"),
            false => (valid_training_checkpoint(), "w.safetensors"),
        };
        let b = mutate(&valid, &flips, cut);
        with_file(&b, name, |p| {
            let _ = StateDict::load(p, Weights::Model);
            let _ = StateDict::load(p, Weights::Ema);
            let _ = arpg::eval::inception::load_state_dict(p);
            if !pt {
                let _ = arpg::train::Trainer::resume(p, None, candle_core::DType::F32, &candle_core::Device::Cpu);
            }
        });
    }

    #[test]
    fn legacy_pytorch_files((flips, cut) in mutations()) {
        let b = mutate(&std::fs::read(fixture("fid/legacy.pth")).unwrap(), &flips, cut);
        with_file(&b, "w.pth", |p| {
            let _ = arpg::eval::inception::load_state_dict(p);
        });
    }

    #[test]
    fn small_text_files((flips, cut) in mutations()) {
        let cfg = br#"{"dim":32,"n_layer":2,"n_head":2,"vocab_size":17,"num_classes":10,"block_size":64,"multiple_of":16,"rope_base":10000.0}"#;
        let toks = b"[[1,2,3,4],[5,6,7,8]]";
        let log = b"{\"step\":1,\"loss\":2.5,\"lr\":0.001,\"grad_norm\":1.0}\n{\"step\":2,\"loss\":2.4,\"lr\":0.001,\"grad_norm\":0.9}\n";
        let vq = br#"{"ch":32,"ch_mult":[1,2],"z_channels":8,"codebook_size":16,"embed_dim":4,"num_res_blocks":1}"#;
        with_file(&mutate(cfg, &flips, cut), "c.json", |p| {
            if let Ok(c) = arpg::ArpgConfig::from_json_file(p) {
                let _ = (c.num_parameters(), c.parameter_shapes(), c.ffn_hidden());
            }
        });
        with_file(&mutate(vq, &flips, cut), "v.json", |p| {
            let _ = arpg::VqConfig::from_json_file(p);
        });
        with_file(&mutate(toks, &flips, cut), "t.json", |p| {
            let _ = arpg::tokenizer::tokens_io::read(p);
        });
        with_file(&mutate(log, &flips, cut), "train.jsonl", |p| {
            if let Ok(c) = arpg::train::plot::read_log(p) {
                let _ = arpg::train::plot::draw(&c);
            }
        });
        let row: String = (0..64).map(|i| format!("{},", i % 17)).collect::<String>() + "3\n";
        let gz = digits_gz(row.repeat(3).as_bytes());
        with_file(&mutate(&gz, &flips, cut), "d.csv.gz", |p| {
            if let Ok(d) = arpg::data::digits::load_csv_gz(p) {
                let (train, test) = arpg::data::digits::split(&d);
                let _ = arpg::eval::digits::report(&[], &train, &test);
            }
        });
        let csv = mutate(row.as_bytes(), &flips, cut);
        with_file(&digits_gz(&csv), "e.csv.gz", |p| {
            let _ = arpg::data::digits::load_csv_gz(p);
        });
    }

    #[test]
    fn images((flips, cut) in mutations(), kind in 0..3u8) {
        let img = image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 25, 7]));
        let mut valid = Vec::new();
        match kind {
            0 => img.write_to(&mut std::io::Cursor::new(&mut valid), image::ImageFormat::Png).unwrap(),
            1 => img.write_to(&mut std::io::Cursor::new(&mut valid), image::ImageFormat::Jpeg).unwrap(),
            _ => {
                // Progressive with restart markers: the JPEG check's other paths.
                let mut e = jpeg_encoder::Encoder::new(&mut valid, 80);
                e.set_progressive(true);
                e.set_restart_interval(1);
                e.encode(img.as_raw(), 12, 9, jpeg_encoder::ColorType::Rgb).unwrap();
            }
        }
        let b = mutate(&valid, &flips, cut);
        if kind > 0 {
            let _ = arpg::tokenizer::jpeg_check::validate(&b);
        }
        with_file(&b, if kind > 0 { "a.jpg" } else { "a.png" }, |p| {
            if let Ok(im) = arpg::tokenizer::image::load_rgb(p) {
                let _ = arpg::data::tokenize::augmentations(&im, 4, true);
            }
        });
    }
}
