//! The training path: gradients reach every parameter and agree with finite differences,
//! and a resumed run continues bit for bit.

use arpg::data::{PackWriter, Packed, Sample};
use arpg::train::dist::{Collective, Done, Pending};
use arpg::train::{StepKind, TrainConfig, Trainer};
use arpg::ArpgConfig;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

fn tiny() -> ArpgConfig {
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
        abs_pos_embed: false,
        control: None,
    }
}

fn synthetic_pack(dir: &std::path::Path, n: usize) -> Packed {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut w = PackWriter::new();
    for i in 0..n {
        let crops = (0..1 + i % 2)
            .map(|_| (0..16).map(|_| rng.random_range(0..11u16)).collect())
            .collect();
        w.push(&Sample {
            label: (i % 3) as u32,
            crops,
        })
        .unwrap();
    }
    let p = dir.join("syn.pack");
    w.write(&p).unwrap();
    Packed::open(&p).unwrap()
}

/// `tiny()` with a learned absolute position embedding.
fn tiny_abs_pos() -> ArpgConfig {
    ArpgConfig {
        abs_pos_embed: true,
        ..tiny()
    }
}

/// A trainer whose zero-initialised head is randomised, so that gradients flow everywhere.
fn trainer_for(cfg: &ArpgConfig, dtype: DType, tc: &TrainConfig) -> Trainer {
    let tr = Trainer::new(cfg, tc, dtype, &Device::Cpu).unwrap();
    for (name, v) in tr.parameters() {
        if name == "head.weight" {
            v.set(&(Tensor::randn(0f32, 0.5, v.shape(), &Device::Cpu).unwrap()))
                .unwrap();
        }
    }
    tr
}

#[test]
fn every_parameter_receives_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pack(dir.path(), 12);
    let tc = TrainConfig {
        class_dropout: 0.5,
        ..Default::default()
    };
    for cfg in [tiny(), tiny_abs_pos()] {
        let mut tr = trainer_for(&cfg, DType::F32, &tc);
        let names: Vec<&String> = tr.parameters().map(|p| p.0).collect();
        assert_eq!(
            names.iter().any(|n| *n == "pos_embeddings.weight"),
            cfg.abs_pos_embed
        );
        let batch = tr.make_batch(&data, &(0..12).collect::<Vec<_>>()).unwrap();
        let grads = tr.loss(&batch).unwrap().backward().unwrap();
        for (name, v) in tr.parameters() {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{name} received no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pack(dir.path(), 4);
    let tc = TrainConfig {
        dropout: 0.0,
        class_dropout: 0.0,
        ..Default::default()
    };
    // Float64 compute makes the central difference exact enough to compare.
    for cfg in [tiny(), tiny_abs_pos()] {
        let mut tr = trainer_for(&cfg, DType::F64, &tc);
        let batch = tr.make_batch(&data, &[0, 1, 2, 3]).unwrap();
        let grads = tr.loss(&batch).unwrap().backward().unwrap();
        let params: Vec<_> = tr
            .parameters()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut checked = 0;
        for (name, v) in &params {
            let g = grads
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let orig = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // Two entries per tensor, including class and token rows of the embedding table.
            for _ in 0..2 {
                let i = if name == "embeddings.weight" {
                    let row = [3usize, 11 + 1 + 1][rng.random_range(0..2)];
                    row * 32 + rng.random_range(0..32)
                } else {
                    rng.random_range(0..orig.len())
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
                    "{name}[{i}]: analytic {an}, finite difference {fd}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 2 * params.len());
    }
}

fn run(tr: &mut Trainer, data: &Packed, until: usize) {
    while tr.step < until {
        tr.train_step(data).unwrap();
    }
}

#[test]
fn resuming_continues_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pack(dir.path(), 10);
    let tc = TrainConfig {
        batch_size: 4,
        grad_accum: 2,
        steps: 100,
        lr: 3e-3,
        warmup_steps: 10,
        ema_decay: Some(0.99),
        ..Default::default()
    };
    let mut full = Trainer::new(&tiny(), &tc, DType::F32, &Device::Cpu).unwrap();
    run(&mut full, &data, 100);

    let mut first = Trainer::new(&tiny(), &tc, DType::F32, &Device::Cpu).unwrap();
    run(&mut first, &data, 50);
    let ckpt = dir.path().join("ckpt.safetensors");
    first.save(&ckpt).unwrap();
    drop(first);
    let mut second = Trainer::resume(&ckpt, None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(second.step, 50);
    run(&mut second, &data, 100);

    let a = full.export_weights();
    let b = second.export_weights();
    for (k, t) in &a {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(x == y, "{k} differs after resuming");
    }
    // The model did learn something: the loss fell.
    let mut fresh = Trainer::new(&tiny(), &tc, DType::F32, &Device::Cpu).unwrap();
    let l0 = fresh.train_step(&data).unwrap().loss;
    let l1 = full.train_step(&data).unwrap_or_else(|_| panic!()).loss;
    assert!(l1 < l0, "loss {l0} -> {l1}");
}

/// An in-process group of threads standing in for NCCL: each rank deposits its tensor,
/// everyone sums in rank order. A bucket's values are taken when it starts and summed when
/// it is waited for (as NCCL's stream would, later), its starts counted in `buckets`.
#[derive(Clone)]
struct ThreadGroup {
    rank: usize,
    world: usize,
    slots: std::sync::Arc<std::sync::Mutex<Vec<Option<Vec<f32>>>>>,
    barrier: std::sync::Arc<std::sync::Barrier>,
    buckets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A [`ThreadGroup`] bucket: the values given and their shapes, summed at the wait.
struct Deferred {
    group: ThreadGroup,
    ts: Vec<Tensor>,
}

impl Pending for Deferred {
    fn wait(self: Box<Self>) -> anyhow::Result<Vec<Tensor>> {
        self.ts
            .iter()
            .map(|t| self.group.all_reduce_sum(t))
            .collect()
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> anyhow::Result<Tensor> {
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.slots.lock().unwrap()[self.rank] = Some(v);
        self.barrier.wait();
        let sum = {
            let s = self.slots.lock().unwrap();
            let mut acc = vec![0f32; t.elem_count()];
            for v in s.iter() {
                for (a, x) in acc.iter_mut().zip(v.as_ref().unwrap()) {
                    *a += x;
                }
            }
            acc
        };
        self.barrier.wait();
        Ok(Tensor::from_vec(sum, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }
    fn all_reduce_start(&self, ts: Vec<Tensor>) -> anyhow::Result<Box<dyn Pending>> {
        self.buckets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A copy: what the bucket held at its start, whatever happens to `ts` meanwhile.
        let ts = ts
            .iter()
            .map(Tensor::copy)
            .collect::<candle_core::Result<_>>()?;
        Ok(Box::new(Deferred {
            group: self.clone(),
            ts,
        }))
    }
}

/// `f(rank, trainer, data)` on two ranks of `tc` joined by a [`ThreadGroup`], one thread each;
/// their results in rank order.
fn on_two_ranks<R: Send + 'static>(
    tc: &TrainConfig,
    data: &std::path::Path,
    f: impl Fn(usize, &mut Trainer, &Packed) -> R + Send + Clone + 'static,
) -> Vec<R> {
    on_two_ranks_counting(tc, data, f).0
}

/// [`on_two_ranks`], and how many buckets the ranks started (both counted).
fn on_two_ranks_counting<R: Send + 'static>(
    tc: &TrainConfig,
    data: &std::path::Path,
    f: impl Fn(usize, &mut Trainer, &Packed) -> R + Send + Clone + 'static,
) -> (Vec<R>, usize) {
    let slots = std::sync::Arc::new(std::sync::Mutex::new(vec![None, None]));
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let buckets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let (slots, barrier, tc, f) = (slots.clone(), barrier.clone(), tc.clone(), f.clone());
            let buckets = buckets.clone();
            let path = data.to_path_buf();
            std::thread::spawn(move || {
                let data = Packed::open(&path).unwrap();
                let mut tr = Trainer::new(&tiny(), &tc, DType::F32, &Device::Cpu).unwrap();
                let g = ThreadGroup {
                    rank,
                    world: 2,
                    slots,
                    barrier,
                    buckets,
                };
                tr.set_group(Box::new(g)).unwrap();
                f(rank, &mut tr, &data)
            })
        })
        .collect();
    let out = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    (out, buckets.load(std::sync::atomic::Ordering::Relaxed))
}

#[test]
fn two_ranks_train_like_one_process_at_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pack(dir.path(), 12);
    // Dropout masks are per rank by design; everything else must agree.
    let tc = TrainConfig {
        batch_size: 8,
        grad_accum: 2,
        steps: 12,
        lr: 3e-3,
        warmup_steps: 2,
        dropout: 0.0,
        ..Default::default()
    };
    let mut single = Trainer::new(&tiny(), &tc, DType::F32, &Device::Cpu).unwrap();
    // Loss and gradient norm (before clipping: AdamW and clipping would hide a wrong scale).
    let single_losses: Vec<(f64, f64)> = (0..12)
        .map(|_| {
            let s = single.train_step(&data).unwrap();
            (s.loss, s.grad_norm)
        })
        .collect();

    let results = on_two_ranks(&tc, &data.path, |_, tr, data| {
        let losses: Vec<(f64, f64)> = (0..12)
            .map(|_| {
                let s = tr.train_step(data).unwrap();
                (s.loss, s.grad_norm)
            })
            .collect();
        (losses, tr.export_weights())
    });
    let want = single.export_weights();
    for (rank, (losses, weights)) in results.iter().enumerate() {
        for (s, (a, b)) in losses.iter().zip(&single_losses).enumerate() {
            assert!(
                (a.0 - b.0).abs() < 1e-5,
                "rank {rank} step {s}: loss {a:?} vs {b:?}"
            );
            assert!(
                (a.1 - b.1).abs() < 1e-5 * b.1,
                "rank {rank} step {s}: grad norm {a:?} vs {b:?}"
            );
        }
        for (k, t) in &want {
            let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = weights[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "rank {rank} {k}: max difference {err}");
        }
    }
    // Both ranks hold the same weights, bit for bit.
    for (k, t) in &results[0].1 {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = results[1].1[k]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(x == y, "{k} differs between the ranks");
    }
}

#[test]
fn the_global_batch_must_split_over_the_ranks() {
    let tc = TrainConfig {
        batch_size: 6,
        grad_accum: 2,
        ..Default::default()
    };
    let mut tr = Trainer::new(&tiny(), &tc, DType::F32, &Device::Cpu).unwrap();
    let g = ThreadGroup {
        rank: 0,
        world: 2,
        slots: Default::default(),
        barrier: std::sync::Arc::new(std::sync::Barrier::new(1)),
        buckets: Default::default(),
    };
    let err = tr.set_group(Box::new(g)).unwrap_err().to_string();
    assert!(err.contains("--batch-size 6"), "{err}");
}

/// Two ranks of `tc` for `steps` steps, ending with a checkpoint taken by both (rank 0 writes
/// `ckpt`); per rank, the weights and the optimizer-moment values it held.
fn two_ranks(
    tc: &TrainConfig,
    data: &std::path::Path,
    steps: usize,
    ckpt: &std::path::Path,
) -> Vec<(std::collections::HashMap<String, Tensor>, usize)> {
    let ckpt = ckpt.to_path_buf();
    on_two_ranks(tc, data, move |rank, tr, data| {
        for _ in 0..steps {
            tr.train_step(data).unwrap();
        }
        let held = tr.moment_elements();
        tr.checkpoint((rank == 0).then_some(ckpt.as_path()))
            .unwrap();
        (tr.export_weights(), held)
    })
}

#[test]
fn zero1_trains_bit_for_bit_like_plain_data_parallel_with_half_the_moments() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pack(dir.path(), 12);
    let tc = TrainConfig {
        batch_size: 8,
        steps: 6,
        lr: 3e-3,
        warmup_steps: 2,
        dropout: 0.0,
        ema_decay: Some(0.9),
        ..Default::default()
    };
    let zc = TrainConfig {
        zero1: true,
        ..tc.clone()
    };
    let (plain_ckpt, zero_ckpt) = (dir.path().join("plain.st"), dir.path().join("zero.st"));
    let plain = two_ranks(&tc, &data.path, 6, &plain_ckpt);
    let zero = two_ranks(&zc, &data.path, 6, &zero_ckpt);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (rank, ((pw, p_held), (zw, z_held))) in plain.iter().zip(&zero).enumerate() {
        for (k, t) in pw {
            assert!(
                flat(t) == flat(&zw[k]),
                "rank {rank}: {k} differs under ZeRO-1"
            );
        }
        // A rank holds its share of the moments only (the tensors split about evenly).
        assert!(
            *z_held < p_held * 7 / 10 && *z_held > p_held * 3 / 10,
            "rank {rank}: {z_held} of {p_held} moment values"
        );
    }
    assert_eq!(
        zero[0].1 + zero[1].1,
        plain[0].1,
        "the shares cover the moments once"
    );
    // The checkpoint gathers the moments: the same file as plain data parallel writes.
    let (a, _) = arpg::checkpoint::load_safetensors_with_metadata(&plain_ckpt).unwrap();
    let (b, _) = arpg::checkpoint::load_safetensors_with_metadata(&zero_ckpt).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert!(
            flat(t) == flat(&b[k]),
            "checkpoint {k} differs under ZeRO-1"
        );
    }
    // A single process continues from it.
    let mut tr = Trainer::resume(&zero_ckpt, None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(tr.step, 6);
    assert!(tr.train_step(&data).unwrap().loss.is_finite());
}

/// Loss and gradient norm per step (before clipping: AdamW and clipping would hide a wrong
/// scale) over `steps` steps, and the weights after them.
fn steps_of(
    tr: &mut Trainer,
    data: &Packed,
    steps: usize,
) -> (Vec<(f64, f64)>, std::collections::HashMap<String, Tensor>) {
    let stats = (0..steps)
        .map(|_| {
            let s = tr.train_step(data).unwrap();
            (s.loss, s.grad_norm)
        })
        .collect();
    (stats, tr.export_weights())
}

#[test]
fn the_hand_step_on_two_ranks_trains_like_one_process_whatever_its_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pack(dir.path(), 12);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = Trainer::new(&tiny(), &TrainConfig::default(), DType::F32, &Device::Cpu)
        .unwrap()
        .parameters()
        .count();
    for grad_accum in [1, 2] {
        let tc = TrainConfig {
            batch_size: 8,
            grad_accum,
            steps: 6,
            lr: 3e-3,
            warmup_steps: 2,
            dropout: 0.0,
            step_kind: StepKind::Hand,
            ..Default::default()
        };
        let mut single = Trainer::new(&tiny(), &tc, DType::F32, &Device::Cpu).unwrap();
        let (want, want_w) = steps_of(&mut single, &data, 6);
        // Buckets of one tensor each, of a few, of all; plain data parallel and ZeRO-1.
        let (each, few, all) = (Some(n), None, Some(1));
        for (bucket_mb, zero1, per_step) in [
            (1e-6, false, each),
            (0.01, false, few),
            (1e3, false, all),
            (1e-6, true, each),
            (1e3, true, all),
        ] {
            let c = TrainConfig {
                bucket_mb,
                zero1,
                ..tc.clone()
            };
            let what = format!("grad_accum {grad_accum}, --bucket-mb {bucket_mb}, zero1 {zero1}");
            let (results, buckets) =
                on_two_ranks_counting(&c, &data.path, |_, tr, data| steps_of(tr, data, 6));
            let started = buckets / 2 / 6;
            match per_step {
                Some(k) => assert_eq!(started, k, "{what}: buckets a step"),
                None => assert!(1 < started && started < n, "{what}: {started} buckets"),
            }
            for (rank, (stats, weights)) in results.iter().enumerate() {
                for (s, (a, b)) in stats.iter().zip(&want).enumerate() {
                    assert!(
                        (a.0 - b.0).abs() < 1e-5,
                        "{what}: rank {rank} step {s}: loss {a:?} vs {b:?}"
                    );
                    assert!(
                        (a.1 - b.1).abs() < 1e-5 * b.1,
                        "{what}: rank {rank} step {s}: grad norm {a:?} vs {b:?}"
                    );
                }
                for (k, t) in &want_w {
                    let err = flat(t)
                        .iter()
                        .zip(&flat(&weights[k]))
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(err < 1e-4, "{what}: rank {rank} {k}: max difference {err}");
                }
            }
            for (k, t) in &results[0].1 {
                assert!(
                    flat(t) == flat(&results[1].1[k]),
                    "{what}: {k} differs between the ranks"
                );
            }
        }
    }
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// One process posing as both ranks of a pair (a sum is twice the tensor), logging every
/// bucket it starts.
struct Recording(Log);

impl Collective for Recording {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&self, t: &Tensor) -> anyhow::Result<Tensor> {
        Ok((t * 2.0)?)
    }
    fn all_reduce_start(&self, ts: Vec<Tensor>) -> anyhow::Result<Box<dyn Pending>> {
        self.0.lock().unwrap().push(format!("start {}", ts.len()));
        let sums = ts.iter().map(|t| self.all_reduce_sum(t));
        Ok(Box::new(Done(sums.collect::<anyhow::Result<_>>()?)))
    }
}

/// Logs the trainer's `arpg::train::grads` trace: each gradient the backward reports final.
struct GradTrace(Log);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for GradTrace {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if e.metadata().target() != "arpg::train::grads" {
            return;
        }
        struct Param(String);
        impl tracing::field::Visit for Param {
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                if f.name() == "param" {
                    self.0 = v.to_string();
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut p = Param(String::new());
        e.record(&mut p);
        self.0.lock().unwrap().push(format!("ready {}", p.0));
    }
}

#[test]
fn buckets_are_summed_while_the_backward_goes_on() {
    use tracing_subscriber::layer::SubscriberExt;
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_pack(dir.path(), 12);
    for (grad_accum, bucket_mb) in [(1, 1e-6), (2, 1e-6), (1, 1e3)] {
        let tc = TrainConfig {
            batch_size: 4,
            grad_accum,
            dropout: 0.0,
            step_kind: StepKind::Hand,
            bucket_mb,
            ..Default::default()
        };
        let log = Log::default();
        let mut tr = Trainer::new(&tiny(), &tc, DType::F32, &Device::Cpu).unwrap();
        tr.set_group(Box::new(Recording(log.clone()))).unwrap();
        let traced = tracing_subscriber::registry().with(GradTrace(log.clone()));
        tracing::subscriber::with_default(traced, || tr.train_step(&data).unwrap());
        let log = log.lock().unwrap().clone();
        let n = tr.parameters().count();
        let at = |what: &str| -> Vec<usize> {
            (0..log.len())
                .filter(|&i| log[i].starts_with(what))
                .collect()
        };
        let (ready, starts) = (at("ready "), at("start "));
        assert_eq!(ready.len(), grad_accum * n, "{log:?}");
        let last = *ready.last().unwrap();
        if bucket_mb < 1.0 {
            // One tensor a bucket: each starts right after the backward reports it, the
            // first long before the last gradient; none while earlier micro-batches only
            // accumulate.
            assert_eq!(starts.len(), n, "{log:?}");
            assert!(starts[0] < last, "{log:?}");
            assert!(starts[0] > ready[(grad_accum - 1) * n], "{log:?}");
            assert!(starts.iter().all(|&s| log[s - 1].starts_with("ready ")));
        } else {
            // One bucket for all: it can only start after the last gradient.
            assert_eq!(starts.len(), 1, "{log:?}");
            assert!(starts[0] > last, "{log:?}");
        }
    }
}
