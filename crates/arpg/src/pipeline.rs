//! Images out: batches of tokens made on this thread, turned into pixels on a second one, so
//! that on a GPU the token decoding of batch k+1 (a CUDA graph of small kernels) runs while the
//! VQ decoder (a few large convolutions, on its own stream) turns batch k into pixels.
//!
//! The order of everything that draws random numbers is unchanged: batches are produced one
//! after another on the calling thread, and the outputs reach `sink` in batch order, so the
//! overlapped and the sequential pipeline give the same bytes.

use anyhow::{anyhow, Result};
use std::sync::mpsc;

/// Batches of tokens in flight between the two stages: the producer runs at most this many
/// batches ahead of the decoder (each holds only its tokens).
const AHEAD: usize = 2;

/// Runs `produce(i)` for batch `i = 0, 1, ...` until it returns `None`, `decode` on each
/// produced value and `sink(i, decoded)` in order. With `overlap`, `decode` runs on a second
/// thread while the next batch is produced; without, all three run here in turn. Returns the
/// number of batches that reached `sink`. The first error of any stage stops the pipeline.
pub fn run<T: Send, P: Send>(
    overlap: bool,
    mut produce: impl FnMut(usize) -> Result<Option<T>>,
    decode: impl Fn(T) -> Result<P> + Send,
    mut sink: impl FnMut(usize, P) -> Result<()>,
) -> Result<usize> {
    if !overlap {
        let mut i = 0;
        while let Some(t) = produce(i)? {
            sink(i, decode(t)?)?;
            i += 1;
        }
        return Ok(i);
    }
    std::thread::scope(|scope| {
        let (to_decoder, jobs) = mpsc::sync_channel::<(usize, T)>(AHEAD - 1);
        let (to_sink, done) = mpsc::channel::<(usize, Result<P>)>();
        let decoder = scope.spawn(move || {
            for (i, t) in jobs {
                let r = decode(t);
                let failed = r.is_err();
                if to_sink.send((i, r)).is_err() || failed {
                    return;
                }
            }
        });
        let mut sunk = 0;
        let mut drain = |block: bool, sunk: &mut usize| -> Result<bool> {
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
                sink(i, r?)?;
                *sunk += 1;
                if !block {
                    return Ok(true);
                }
            }
        };
        let mut i = 0;
        let produced: Result<()> = (|| {
            while let Some(t) = produce(i)? {
                // The decoder stopped early only after an error, which `drain` reports.
                if to_decoder.send((i, t)).is_err() {
                    break;
                }
                i += 1;
                while drain(false, &mut sunk)? {}
            }
            Ok(())
        })();
        drop(to_decoder);
        // After an error nothing more reaches `sink`; the decoder finishes its queue and stops.
        let drained = match &produced {
            Ok(()) => drain(true, &mut sunk),
            Err(_) => Ok(false),
        };
        decoder
            .join()
            .map_err(|_| anyhow!("the image decoding thread panicked"))?;
        produced?;
        drained?;
        Ok(sunk)
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
        assert_eq!(made, n);
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
        assert_eq!(made, 3);
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
