//! `sampler::decode_rows`: a group of sequences decoded in a batch with others gets the tokens
//! it gets decoded alone with the same generator (the server's batching-independence rule).

use arpg::checkpoint::random_var_builder;
use arpg::config::ArpgConfig;
use arpg::model::Arpg;
use arpg::sampler::{decode, decode_rows, random_order, Request, Rows, SampleConfig, TokenFilter};
use candle_core::{DType, Device};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn tiny() -> Arpg {
    let cfg = ArpgConfig {
        dim: 32,
        n_layer: 4,
        n_head: 2,
        vocab_size: 13,
        num_classes: 3,
        block_size: 16,
        multiple_of: 16,
        norm_eps: 1e-5,
        rope_base: 10000.0,
        ffn_dim_multiplier: None,
        cls_token_num: 1,
        abs_pos_embed: false,
        control: None,
    };
    Arpg::new(&cfg, random_var_builder(5, DType::F32, &Device::Cpu)).unwrap()
}

#[test]
fn a_group_gets_the_same_tokens_batched_as_alone() {
    let m = tiny();
    let sc = SampleConfig {
        steps: 5,
        cfg: 3.0,
        filter: TokenFilter {
            temperature: 1.0,
            top_k: 8,
            top_p: 0.95,
        },
        ..Default::default()
    };
    let all: Vec<usize> = (0..16).collect();
    // Three groups of 2, 3 and 1 sequences, each with its own seed and orders.
    let groups: Vec<(Vec<usize>, u64)> = vec![(vec![0, 1], 7), (vec![2, 2, 1], 8), (vec![0], 9)];
    let mut alone = Vec::new();
    let mut orders = Vec::new();
    let mut rngs = Vec::new();
    for (classes, seed) in &groups {
        let mut r = ChaCha8Rng::seed_from_u64(*seed);
        let o: Vec<Vec<usize>> = classes.iter().map(|_| random_order(&all, &mut r)).collect();
        let mut solo = r.clone();
        let known = vec![vec![]; classes.len()];
        let req = Request {
            classes,
            known: &known,
            orders: &o,
            condition: None,
        };
        alone.push(decode(&m, &req, &sc, &mut solo).unwrap());
        orders.extend(o);
        rngs.push(r);
    }
    let classes: Vec<usize> = groups.iter().flat_map(|g| g.0.clone()).collect();
    let of: Vec<usize> = groups
        .iter()
        .enumerate()
        .flat_map(|(i, g)| std::iter::repeat_n(i, g.0.len()))
        .collect();
    let known = vec![vec![]; classes.len()];
    let mut steps = Vec::new();
    let mut on_step = |s: usize, n: usize| steps.push((s, n));
    let batched = decode_rows(
        &m,
        &Request {
            classes: &classes,
            known: &known,
            orders: &orders,
            condition: None,
        },
        &sc,
        &mut Rows {
            rngs: &mut rngs,
            of: &of,
            on_step: &mut on_step,
        },
    )
    .unwrap();
    assert_eq!(steps, (1..=5).map(|s| (s, 5)).collect::<Vec<_>>());
    let mut at = 0;
    for (g, solo) in groups.iter().zip(&alone) {
        assert_eq!(&batched[at..at + g.0.len()], &solo[..]);
        at += g.0.len();
    }
}
