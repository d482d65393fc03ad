//! Images out: batches of tokens made on this thread, turned into pixels on a second one, so
//! that on a GPU the token decoding of batch k+1 (a CUDA graph of small kernels) runs while the
//! VQ decoder (a few large convolutions, on its own stream) turns batch k into pixels.
//!
//! The order of everything that draws random numbers is unchanged: batches are produced one
//! after another on the calling thread, and the outputs reach `sink` in batch order, so the
//! overlapped and the sequential pipeline give the same bytes.

use anyhow::{anyhow, Result};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Batches of tokens in flight between the two stages: the producer runs at most this many
/// batches ahead of the decoder (each holds only its tokens).
const AHEAD: usize = 2;

/// Where a pipeline's time went: each stage's busy time, so that a slow run shows whether a
/// stage or the hand-over between them is what limits it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Batches that reached `sink`.
    pub batches: usize,
    /// From the start until the first batch was sunk: on a GPU it holds the one-off work
    /// (graph capture, cuDNN's algorithm search) that later batches do not repeat.
    pub first: Duration,
    /// The whole run.
    pub wall: Duration,
    /// Time spent in `produce`, `decode` and `sink`, each summed over the batches.
    pub produce: Duration,
    pub decode: Duration,
    pub sink: Duration,
}

impl Stats {
    /// Items per second after the first batch, of `items(i)` items in batch `i`: what a long
    /// run approaches, and what a benchmark that warms up first (as the paper's loop is timed)
    /// measures. None with fewer than two batches.
    pub fn steady_rate(&self, items: impl Fn(usize) -> usize) -> Option<f64> {
        let secs = (self.wall - self.first).as_secs_f64();
        let n: usize = (1..self.batches).map(items).sum();
        (self.batches > 1 && secs > 0.0).then(|| n as f64 / secs)
    }
}

/// Adds the time `f` takes to `total`.
fn timed<R>(total: &mut Duration, f: impl FnOnce() -> R) -> R {
    let t = Instant::now();
    let r = f();
    *total += t.elapsed();
    r
}

/// Runs `produce(i)` for batch `i = 0, 1, ...` until it returns `None`, `decode` on each
/// produced value and `sink(i, decoded)` in order. With `overlap`, `decode` runs on a second
/// thread while the next batch is produced; without, all three run here in turn. Returns
/// the batches that reached `sink` and the stages' times. The first error of any stage stops
/// the pipeline.
pub fn run<T: Send, P: Send>(
    overlap: bool,
    mut produce: impl FnMut(usize) -> Result<Option<T>>,
    decode: impl Fn(T) -> Result<P> + Send,
    mut sink: impl FnMut(usize, P) -> Result<()>,
) -> Result<Stats> {
    let start = Instant::now();
    let mut st = Stats::default();
    let mut timed_sink = |i: usize, p: P, st: &mut Stats| -> Result<()> {
        timed(&mut st.sink, || sink(i, p))?;
        if i == 0 {
            st.first = start.elapsed();
        }
        st.batches = i + 1;
        Ok(())
    };
    if !overlap {
        let mut i = 0;
        while let Some(t) = timed(&mut st.produce, || produce(i))? {
            let p = timed(&mut st.decode, || decode(t))?;
            timed_sink(i, p, &mut st)?;
            i += 1;
        }
        st.wall = start.elapsed();
        return Ok(st);
    }
    std::thread::scope(|scope| {
        let (to_decoder, jobs) = mpsc::sync_channel::<(usize, T)>(AHEAD - 1);
        let (to_sink, done) = mpsc::channel::<(usize, Result<P>)>();
        let decoder = scope.spawn(move || {
            let mut busy = Duration::ZERO;
            for (i, t) in jobs {
                let r = timed(&mut busy, || decode(t));
                let failed = r.is_err();
                if to_sink.send((i, r)).is_err() || failed {
                    break;
                }
            }
            busy
        });
        let mut sunk = 0;
        let mut drain = |block: bool, sunk: &mut usize, st: &mut Stats| -> Result<bool> {
            loop {
                let next = if block {
                    done.recv().ok()
                } else {
                    done.try_recv().ok()
                };
                let Some((i, r)) = next else {
                    return Ok(false);
                };
                debug_assert_eq!(i, *sunk, "the decoder keeps batch order");
                timed_sink(i, r?, st)?;
                *sunk += 1;
                if !block {
                    return Ok(true);
                }
            }
        };
        let mut i = 0;
        let produced: Result<()> = (|| {
            while let Some(t) = timed(&mut st.produce, || produce(i))? {
                // The decoder stopped early only after an error, which `drain` reports.
                if to_decoder.send((i, t)).is_err() {
                    break;
                }
                i += 1;
                while drain(false, &mut sunk, &mut st)? {}
            }
            Ok(())
        })();
        drop(to_decoder);
        // After an error nothing more reaches `sink`; the decoder finishes its queue and stops.
        let drained = match &produced {
            Ok(()) => drain(true, &mut sunk, &mut st),
            Err(_) => Ok(false),
        };
        st.decode = decoder
            .join()
            .map_err(|_| anyhow!("the image decoding thread panicked"))?;
        produced?;
        drained?;
        st.wall = start.elapsed();
        Ok(st)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;
    use std::cell::RefCell;

    fn collect(overlap: bool, n: usize) -> Vec<(usize, u64)> {
        let out = RefCell::new(Vec::new());
        let made = run(
            overlap,
            |i| Ok((i < n).then(|| i as u64 * 7)),
            |t| {
                // Uneven decode times, so an unordered decoder would show.
                std::thread::sleep(std::time::Duration::from_millis((t % 3) * 2));
                Ok(t * t)
            },
            |i, p| {
                out.borrow_mut().push((i, p));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(made.batches, n);
        out.into_inner()
    }

    #[test]
    fn overlapped_equals_sequential_in_order() {
        let seq = collect(false, 9);
        assert_eq!(
            seq,
            (0..9)
                .map(|i| (i, (i as u64 * 7).pow(2)))
                .collect::<Vec<_>>()
        );
        assert_eq!(collect(true, 9), seq);
        assert_eq!(collect(true, 0), vec![]);
    }

    #[test]
    fn producer_runs_ahead_of_the_decoder() {
        // Decoding batch 0 waits until batch 1 is being produced: only an overlapped pipeline
        // gets past it (a sequential one would time out here).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let made = run(
            true,
            |i| {
                if i == 1 {
                    tx.send(()).unwrap();
                }
                Ok((i < 3).then_some(i))
            },
            move |t| {
                if t == 0 {
                    rx.recv_timeout(std::time::Duration::from_secs(20))
                        .map_err(|_| anyhow!("batch 1 was not produced while 0 decoded"))?;
                }
                Ok(t)
            },
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(made.batches, 3);
    }

    #[test]
    fn stats_count_each_stage_and_the_first_batch() {
        let ms = std::time::Duration::from_millis;
        for overlap in [false, true] {
            let st = run(
                overlap,
                |i| {
                    // The first batch is slow, as a graph capture makes it.
                    std::thread::sleep(ms(if i == 0 { 120 } else { 10 }));
                    Ok((i < 4).then_some(i))
                },
                |t| {
                    std::thread::sleep(ms(20));
                    Ok(t)
                },
                |_, _| {
                    std::thread::sleep(ms(5));
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(st.batches, 4);
            // Five calls of produce (the last says "no more"), four of decode and of sink.
            assert!(st.produce >= ms(160), "{st:?}");
            assert!(st.decode >= ms(80) && st.sink >= ms(20), "{st:?}");
            assert!(st.first >= ms(145) && st.first <= st.wall, "{st:?}");
            let rate = st.steady_rate(|_| 8).unwrap();
            let expect = 24.0 / (st.wall - st.first).as_secs_f64();
            assert!((rate - expect).abs() < 1e-9, "{rate} {expect}");
            // The steady rate leaves the slow first batch out.
            assert!(rate > 32.0 / st.wall.as_secs_f64());
        }
        assert_eq!(Stats::default().steady_rate(|_| 1), None);
    }

    #[test]
    fn errors_of_any_stage_stop_it() {
        let sunk = RefCell::new(0);
        for overlap in [false, true] {
            let e = run(
                overlap,
                |i| Ok((i < 100).then_some(i)),
                |t| {
                    if t == 3 {
                        bail!("decode {t} failed")
                    } else {
                        Ok(t)
                    }
                },
                |_, _| {
                    *sunk.borrow_mut() += 1;
                    Ok(())
                },
            )
            .unwrap_err();
            assert!(e.to_string().contains("decode 3 failed"), "{e}");
            let e = run(
                overlap,
                |i| {
                    if i == 2 {
                        bail!("produce {i} failed")
                    } else {
                        Ok(Some(i))
                    }
                },
                Ok,
                |_, _| Ok(()),
            )
            .unwrap_err();
            assert!(e.to_string().contains("produce 2 failed"), "{e}");
            let e = run(
                overlap,
                |i| Ok((i < 100).then_some(i)),
                Ok,
                |i, _| {
                    if i == 4 {
                        bail!("sink {i} failed")
                    } else {
                        Ok(())
                    }
                },
            )
            .unwrap_err();
            assert!(e.to_string().contains("sink 4 failed"), "{e}");
        }
        assert!(
            *sunk.borrow() <= 6,
            "batches after a failed decode were sunk"
        );
    }
}
