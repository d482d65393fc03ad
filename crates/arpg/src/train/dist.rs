//! Data-parallel training: one process per GPU, gradients summed over NCCL.
//!
//! Every rank builds the same global batch from the same seeded generator and keeps its own
//! slice of rows, so N ranks at global batch B see exactly the samples, orders and class
//! drops of one process at batch B; the averaged gradient is the full batch's. The gradients
//! travel in buckets ([`BucketReducer`]) while the backward computes the rest.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

/// Sums tensors over the processes of a data-parallel group.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The elementwise sum over all ranks of `t` (same shape and dtype on every rank).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Starts summing a bucket of tensors over the ranks (every rank starts the same buckets
    /// in the same order, their tensors alike in shape and dtype); [`Pending::wait`] gives the
    /// sums in the same order. The tensors are the caller's to give away: no one else reads
    /// or writes them until the wait, and an implementation may sum into them in place. By
    /// default each is summed at once by [`Collective::all_reduce_sum`].
    fn all_reduce_start(&self, ts: Vec<Tensor>) -> Result<Box<dyn Pending>> {
        let sums = ts
            .iter()
            .map(|t| self.all_reduce_sum(t))
            .collect::<Result<_>>()?;
        Ok(Box::new(Done(sums)))
    }

    /// Rank `root`'s `t` on every rank (the others' `t` gives only the shape and dtype). By
    /// default the root's values summed with zeros: exact, at the cost of an all-reduce.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let x = match self.rank() == root {
            true => t.clone(),
            false => t.zeros_like()?,
        };
        self.all_reduce_sum(&x)
    }
}

/// A bucket's sums on their way ([`Collective::all_reduce_start`]).
pub trait Pending {
    /// The sums, in the order the tensors were given, once they are there (on a GPU: once
    /// the device's stream is ordered after them).
    fn wait(self: Box<Self>) -> Result<Vec<Tensor>>;
}

/// Sums already there.
pub struct Done(pub Vec<Tensor>);

impl Pending for Done {
    fn wait(self: Box<Self>) -> Result<Vec<Tensor>> {
        Ok(self.0)
    }
}

/// `--bucket-mb` in bytes (at least one).
pub fn bucket_bytes(mb: f64) -> usize {
    (mb * (1u64 << 20) as f64).ceil().max(1.0) as usize
}

/// A step's f32 gradients summed over the ranks in buckets, as PyTorch DDP does: the
/// gradients fill the open bucket in the order they become final, and a bucket starts its
/// all-reduce ([`Collective::all_reduce_start`]) the moment it holds `cap` bytes, so the sums
/// travel while the backward computes the rest. Every bucket but the last holds at least
/// `cap` bytes and less without its last tensor. All ranks run the same backward, so they
/// push the same tensors in the same order and start the same buckets.
pub struct BucketReducer<'g> {
    group: &'g dyn Collective,
    cap: usize,
    open: Vec<(usize, Tensor)>,
    open_bytes: usize,
    /// Started buckets: their tensors' indices and the sums on their way.
    started: Vec<(Vec<usize>, Box<dyn Pending>)>,
    pushed: Vec<bool>,
}

impl<'g> BucketReducer<'g> {
    /// Buckets of `cap` bytes for the gradients `0..n`.
    pub fn new(group: &'g dyn Collective, n: usize, cap: usize) -> Self {
        Self {
            group,
            cap: cap.max(1),
            open: Vec::new(),
            open_bytes: 0,
            started: Vec::new(),
            pushed: vec![false; n],
        }
    }

    /// Gradient `i` is final: into the open bucket, which starts if it is full. `g` is f32
    /// and the reducer's alone (it may be summed in place).
    pub fn push(&mut self, i: usize, g: Tensor) -> Result<()> {
        ensure!(
            i < self.pushed.len() && !self.pushed[i],
            "gradient {i} pushed twice or out of range"
        );
        ensure!(g.dtype() == DType::F32, "gradient {i} is {:?}", g.dtype());
        self.pushed[i] = true;
        self.open_bytes += g.elem_count() * 4;
        self.open.push((i, g));
        if self.open_bytes >= self.cap {
            self.start()?;
        }
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        let (idx, ts): (Vec<usize>, Vec<Tensor>) =
            std::mem::take(&mut self.open).into_iter().unzip();
        self.open_bytes = 0;
        let pending = self.group.all_reduce_start(ts)?;
        self.started.push((idx, pending));
        Ok(())
    }

    /// Buckets started so far.
    pub fn buckets_started(&self) -> usize {
        self.started.len()
    }

    /// Starts the last bucket and waits for all, in order: the sums by index (`None` for a
    /// gradient never pushed).
    pub fn finish(mut self) -> Result<Vec<Option<Tensor>>> {
        if !self.open.is_empty() {
            self.start()?;
        }
        let mut out = vec![None; self.pushed.len()];
        for (idx, pending) in self.started {
            let sums = pending.wait()?;
            ensure!(
                sums.len() == idx.len(),
                "a bucket of {} tensors came back with {}",
                idx.len(),
                sums.len()
            );
            for (i, s) in idx.into_iter().zip(sums) {
                out[i] = Some(s);
            }
        }
        Ok(out)
    }
}

/// ZeRO-1: the rank that keeps each tensor's optimizer moments and updates it, given the
/// tensors' sizes. Largest first, each to the least-loaded rank (ties to the lowest), so the
/// ranks hold about 1/world of the moments each and every rank computes the same owners.
pub fn zero1_owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
    let mut load = vec![0usize; world];
    let mut owner = vec![0usize; sizes.len()];
    for i in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owner[i] = r;
        load[r] += sizes[i];
    }
    owner
}

/// Where the ranks of a run meet: the launcher variables of torchrun and friends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// `None` when `WORLD_SIZE` is unset; an error naming the variable when one is malformed.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |k: &str, v: &str| -> Result<usize> {
            v.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("environment variable {k}={v:?} is not a number"))
        };
        let world_size = num("WORLD_SIZE", &world)?;
        anyhow::ensure!(world_size >= 1, "WORLD_SIZE must be at least 1");
        let rank = match get("RANK") {
            Some(v) => num("RANK", &v)?,
            None => anyhow::bail!("WORLD_SIZE is set but RANK is not"),
        };
        anyhow::ensure!(
            rank < world_size,
            "RANK={rank} is not below WORLD_SIZE={world_size}"
        );
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(v) => {
                let p = num("MASTER_PORT", &v)?;
                u16::try_from(p)
                    .map_err(|_| anyhow::anyhow!("MASTER_PORT={p} is not a port number"))?
            }
            None if world_size == 1 => 0,
            None => anyhow::bail!("WORLD_SIZE={world_size} needs MASTER_PORT (and MASTER_ADDR)"),
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }
}

impl DistEnv {
    /// This process's place in a run of several processes, if it is one.
    pub fn of_run() -> Result<Option<Self>> {
        Ok(Self::from_env()?.filter(|d| d.world_size > 1))
    }

    /// The device of a worker: `cuda:LOCAL_RANK` (a worker has a GPU of its own).
    pub fn worker_device(&self) -> String {
        format!("cuda:{}", self.local_rank)
    }
}

/// Whether `--gpus n` asks this process to launch workers rather than work itself (it is
/// not one already).
pub fn should_spawn(gpus: usize) -> Result<bool> {
    anyhow::ensure!(gpus >= 1, "--gpus must be at least 1");
    Ok(gpus > 1 && DistEnv::from_env()?.is_none())
}

/// One process per GPU, as torchrun starts them: re-executes the current command line `n`
/// times with the launcher variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
/// MASTER_PORT) and waits for all, failing (and stopping the others, which would wait on the
/// dead rank forever) as soon as one fails. `Ok(false)`: the workers stopped on Ctrl-C.
pub fn spawn_workers(n: usize) -> Result<bool> {
    use anyhow::Context;
    use std::process::{Child, Command};
    let exe = std::env::current_exe().context("cannot find this executable to re-run it")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p,
        Err(_) => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
            .to_string(),
    };
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    eprintln!("launching {n} processes (one per GPU), rendezvous at {addr}:{port}");
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", &port)
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(Some(child));
    }
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    while children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            if let Some(status) = slot.as_mut().map(Child::try_wait).transpose()?.flatten() {
                *slot = None;
                if !status.success() && failed.is_none() {
                    failed = Some((rank, status));
                }
            }
        }
        if failed.is_some() {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match failed {
        // Ctrl-C reaches every worker; they stop together and exit 130.
        Some((_, s)) if s.code() == Some(130) => Ok(false),
        Some((rank, s)) => anyhow::bail!("rank {rank} failed ({s}); stopped the other ranks"),
        None => Ok(true),
    }
}

/// Rank 0 serves `payload` to the other ranks over TCP at `addr:port`; the others fetch it
/// (retrying while rank 0 starts). Used to hand out the NCCL unique id.
pub fn exchange_bytes(env: &DistEnv, payload: Option<&[u8]>, len: usize) -> Result<Vec<u8>> {
    use anyhow::Context;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    if env.rank == 0 {
        let payload = payload.context("rank 0 must provide the payload")?;
        anyhow::ensure!(payload.len() == len, "payload of {} bytes", payload.len());
        let listener = TcpListener::bind(&addr)
            .with_context(|| format!("rank 0 cannot listen on MASTER_ADDR:MASTER_PORT = {addr}"))?;
        for _ in 1..env.world_size {
            let (mut s, _) = listener.accept()?;
            s.write_all(payload)?;
        }
        Ok(payload.to_vec())
    } else {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            match TcpStream::connect(&addr) {
                Ok(mut s) => {
                    let mut buf = vec![0u8; len];
                    s.read_exact(&mut buf)
                        .with_context(|| format!("reading the group id from {addr}"))?;
                    return Ok(buf);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("rank {} waiting for {addr}: {e}", env.rank);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    anyhow::bail!("rank {} cannot reach rank 0 at {addr}: {e}", env.rank)
                }
            }
        }
    }
}

#[cfg(feature = "nccl")]
pub use nccl::NcclGroup;

/// On a CUDA device, with NCCL: a one-rank communicator's buckets (reduced asynchronously
/// while the device computes), all-reduce and broadcast against their inputs (a one-rank sum
/// is its input), the largest difference (0 when the plumbing holds). `None` elsewhere.
pub fn nccl_self_check(device: &candle_core::Device) -> Result<Option<f64>> {
    #[cfg(feature = "nccl")]
    return nccl::self_check(device);
    #[cfg(not(feature = "nccl"))]
    {
        let _ = device;
        Ok(None)
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    //! NCCL on a CUDA stream of its own, ordered against the device's stream by events.
    //!
    //! Why buffers shared by the two streams are safe. candle leaves cudarc's per-buffer event
    //! tracking on, but cudarc records those events only once the context has a second
    //! stream that cudarc counts (`CudaStream::fork`, `CudaContext::new_stream`), and from
    //! then on for every argument of every kernel launch of the process. The stream here is
    //! created by the driver call and wrapped as a borrowed stream, so the context stays in
    //! single-stream mode: nothing is tracked for us, and these rules are what orders it:
    //! - before NCCL reads a buffer, its stream waits on an event recorded on the compute
    //!   stream after the kernels (and stream-ordered allocations) that produced it;
    //! - after the NCCL calls, an event on NCCL's stream, which the compute stream waits on
    //!   before anything reads the sums (`Pending::wait`, or before a synchronous call
    //!   returns);
    //! - the buffers stay alive until that wait is queued (the pending bucket holds them; if
    //!   dropped unwaited it queues the wait first), and candle frees on the compute stream
    //!   (`cuMemFreeAsync`), so no buffer is freed or reused before NCCL is done with it;
    //! - a bucket's tensors are the trainer's own fresh gradients: nothing else reads or
    //!   writes them while they are summed in place.
    //!
    //! Where the context is in multi-stream mode anyway (the process opened a second stream
    //! through cudarc), its tracking adds waits that these events make redundant.

    use super::{exchange_bytes, Collective, DistEnv, Pending};
    use anyhow::{ensure, Context, Result};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{result as drv, sys, CudaEvent, CudaStream};
    use candle_core::cuda_backend::cudarc::nccl::safe::{
        group_end, group_start, Comm, Id, ReduceOp,
    };
    use candle_core::{CudaStorage, CustomOp1, DType, Device, InplaceOp1, Layout, Shape, Tensor};
    use std::mem::ManuallyDrop;
    use std::sync::Arc;

    fn cuda_err(what: &str) -> impl Fn(drv::DriverError) -> anyhow::Error + '_ {
        move |e| anyhow::anyhow!("{what}: {e:?}")
    }

    /// A communicator on a stream of its own, beside the device's (compute) stream.
    struct Side {
        comm: ManuallyDrop<Comm>,
        /// The device's stream, where candle computes.
        compute: Arc<CudaStream>,
        /// NCCL's stream: a wrapper that does not own `raw` (see the module's comment).
        stream: Arc<CudaStream>,
        raw: sys::CUstream,
    }

    // The communicator and the streams are used from the one thread that drives the device.
    unsafe impl Send for Side {}
    unsafe impl Sync for Side {}

    impl Side {
        /// NCCL's stream (at the highest priority: its kernels take few SMs and the backward
        /// waits on none of them) and the communicator `connect` makes on it.
        fn new(
            compute: Arc<CudaStream>,
            connect: impl FnOnce(Arc<CudaStream>) -> Result<Comm>,
        ) -> Result<Self> {
            let ctx = compute.context().clone();
            ctx.bind_to_thread()
                .map_err(cuda_err("binding the CUDA context"))?;
            let (_, highest) = drv::stream::get_priority_range()
                .map_err(cuda_err("cuCtxGetStreamPriorityRange"))?;
            let raw =
                drv::stream::create_with_priority(drv::stream::StreamKind::NonBlocking, highest)
                    .map_err(cuda_err("creating NCCL's stream"))?;
            // Safety: `raw` is a stream of this context; `drop` destroys it after the
            // communicator, the last user of the wrapper.
            let stream = unsafe { ctx.wrap_borrowed_stream(raw) };
            match connect(stream.clone()) {
                Ok(comm) => Ok(Self {
                    comm: ManuallyDrop::new(comm),
                    compute,
                    stream,
                    raw,
                }),
                Err(e) => {
                    // Safety: created above, used by nothing.
                    let _ = unsafe { drv::stream::destroy(raw) };
                    Err(e)
                }
            }
        }

        /// NCCL's stream waits for everything queued on the compute stream so far.
        fn after_compute(&self) -> Result<()> {
            let ev = self
                .compute
                .record_event(None)
                .map_err(cuda_err("cuEventRecord"))?;
            self.stream.wait(&ev).map_err(cuda_err("cuStreamWaitEvent"))
        }

        /// An event after everything queued on NCCL's stream so far.
        fn mark(&self) -> Result<CudaEvent> {
            self.stream
                .record_event(None)
                .map_err(cuda_err("cuEventRecord"))
        }

        /// The compute stream waits for `ev` (NCCL's work up to it).
        fn compute_after(&self, ev: &CudaEvent) -> Result<()> {
            self.compute.wait(ev).map_err(cuda_err("cuStreamWaitEvent"))
        }
    }

    impl Drop for Side {
        fn drop(&mut self) {
            let _ = self.stream.synchronize();
            // Safety: dropped once, here, and not used after.
            unsafe { ManuallyDrop::drop(&mut self.comm) };
            let _ = self.compute.context().bind_to_thread();
            // Safety: created in `new`; nothing uses it any more.
            let _ = unsafe { drv::stream::destroy(self.raw) };
        }
    }

    /// An NCCL communicator on a stream of its own, gated against the device's stream by
    /// events (the module's comment says why that is safe).
    pub struct NcclGroup {
        side: Arc<Side>,
        rank: usize,
        world_size: usize,
    }

    impl NcclGroup {
        pub fn connect(env: &DistEnv, device: &Device) -> Result<Self> {
            let cuda = device
                .as_cuda_device()
                .context("NCCL training needs a CUDA device")?;
            let id = if env.rank == 0 {
                let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
                let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
                exchange_bytes(env, Some(&bytes), 128)?;
                id
            } else {
                let bytes = exchange_bytes(env, None, 128)?;
                let mut internal = [0 as std::ffi::c_char; 128];
                for (d, s) in internal.iter_mut().zip(bytes) {
                    *d = s as std::ffi::c_char;
                }
                Id::uninit(internal)
            };
            let side = Side::new(cuda.cuda_stream(), |stream| {
                Comm::from_rank(stream, env.rank, env.world_size, id)
                    .map_err(|e| anyhow::anyhow!("ncclCommInitRank (rank {}): {e:?}", env.rank))
            })?;
            Ok(Self {
                side: Arc::new(side),
                rank: env.rank,
                world_size: env.world_size,
            })
        }
    }

    fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("ncclAllReduce: {e:?}"))
    }

    /// Out-of-place all-reduce into a fresh tensor, fenced both ways.
    struct AllReduce<'a>(&'a Side);

    impl CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("NCCL all-reduce needs a CUDA tensor")
        }
        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let src = crate::kernels::cuda::view::<f32>(s, l, "NCCL all-reduce")?;
            let dev = s.device().clone();
            // Safety: NCCL writes every element of dst before anything reads it.
            let mut dst = unsafe { dev.alloc::<f32>(src.len()) }?;
            let msg = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
            self.0.after_compute().map_err(msg)?;
            self.0
                .comm
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(nccl_err)?;
            // `src` (the caller's tensor) lives until this returns, after the wait.
            let done = self.0.mark().map_err(msg)?;
            self.0.compute_after(&done).map_err(msg)?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    /// One tensor's in-place all-reduce, queued into the open NCCL group.
    struct InPlace<'a>(&'a Side);

    impl InplaceOp1 for InPlace<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-in-place"
        }
        fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("NCCL all-reduce needs a CUDA tensor")
        }
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
            let mut v = crate::kernels::cuda::view_mut::<f32>(s, l, "NCCL all-reduce")?;
            self.0
                .comm
                .all_reduce_in_place(&mut v, &ReduceOp::Sum)
                .map_err(nccl_err)?;
            Ok(())
        }
    }

    /// A bucket summed in place on NCCL's stream: the tensors are held until the compute
    /// stream is ordered after `done`.
    struct InFlight {
        side: Arc<Side>,
        done: Option<CudaEvent>,
        ts: Vec<Tensor>,
    }

    impl Pending for InFlight {
        fn wait(mut self: Box<Self>) -> Result<Vec<Tensor>> {
            if let Some(ev) = &self.done {
                self.side.compute_after(ev)?;
            }
            self.done = None;
            Ok(std::mem::take(&mut self.ts))
        }
    }

    impl Drop for InFlight {
        fn drop(&mut self) {
            // Unwaited (an error on the way): the buffers must outlive NCCL's use of them.
            if let Some(ev) = self.done.take() {
                if self.side.compute_after(&ev).is_err() {
                    let _ = self.side.stream.synchronize();
                }
            }
        }
    }

    impl Collective for NcclGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world_size
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            let x = t.to_dtype(DType::F32)?.contiguous()?;
            Ok(x.apply_op1_no_bwd(&AllReduce(&self.side))?
                .to_dtype(t.dtype())?)
        }

        /// One NCCL group of in-place all-reduces on NCCL's stream, after the compute
        /// stream's work so far; the wait orders the compute stream after them.
        fn all_reduce_start(&self, ts: Vec<Tensor>) -> Result<Box<dyn Pending>> {
            for t in &ts {
                ensure!(
                    t.dtype() == DType::F32 && t.device().is_cuda() && t.is_contiguous(),
                    "a bucket's tensors are contiguous f32 CUDA tensors, not {:?} {:?}",
                    t.dtype(),
                    t.device().location()
                );
            }
            let side = &self.side;
            side.after_compute()?;
            group_start().map_err(|e| anyhow::anyhow!("ncclGroupStart: {e:?}"))?;
            let queued = ts.iter().try_for_each(|t| t.inplace_op1(&InPlace(side)));
            let ended = group_end();
            // Whatever was queued runs: hold the tensors until the compute stream waits.
            let done = match side.mark() {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = side.stream.synchronize();
                    return Err(e);
                }
            };
            let flight = Box::new(InFlight {
                side: side.clone(),
                done: Some(done),
                ts,
            });
            queued?;
            ended.map_err(|e| anyhow::anyhow!("ncclGroupEnd: {e:?}"))?;
            Ok(flight)
        }
    }

    /// [`super::nccl_self_check`].
    pub fn self_check(device: &Device) -> Result<Option<f64>> {
        let Ok(cuda) = device.as_cuda_device() else {
            return Ok(None);
        };
        let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
        let side = Side::new(cuda.cuda_stream(), |stream| {
            Comm::from_rank(stream, 0, 1, id)
                .map_err(|e| anyhow::anyhow!("ncclCommInitRank (one rank): {e:?}"))
        })?;
        let g = NcclGroup {
            side: Arc::new(side),
            rank: 0,
            world_size: 1,
        };
        let busy = Tensor::randn(0f32, 1.0, (2048, 2048), device)?;
        let buckets: [&[(usize, usize)]; 3] = [
            &[(3, 5), (1024, 1024), (1, 1)],
            &[(257, 129)],
            &[(4096, 1024), (7, 3), (2, 2048)],
        ];
        let mut flights = Vec::new();
        for shapes in buckets {
            let ts: Vec<Tensor> = shapes
                .iter()
                .map(|&s| Tensor::randn(0f32, 1.0, s, device))
                .collect::<candle_core::Result<_>>()?;
            let want: Vec<Tensor> = ts
                .iter()
                .map(Tensor::copy)
                .collect::<candle_core::Result<_>>()?;
            flights.push((g.all_reduce_start(ts)?, want));
            // The device computes while the bucket is on its way.
            let _ = busy.matmul(&busy)?;
        }
        let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64)
        };
        let mut worst = 0f64;
        for (flight, want) in flights {
            let got = flight.wait()?;
            ensure!(got.len() == want.len(), "a bucket came back short");
            for (a, b) in got.iter().zip(&want) {
                ensure!(a.dims() == b.dims(), "{:?} vs {:?}", a.dims(), b.dims());
                worst = worst.max(diff(a, b)?);
            }
        }
        let t = Tensor::randn(0f32, 1.0, (333, 77), device)?;
        worst = worst.max(diff(&g.all_reduce_sum(&t)?, &t)?);
        worst = worst.max(diff(&g.broadcast(&t, 0)?, &t)?);
        Ok(Some(worst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::{Arc, Mutex};

    /// A group of two ranks that are both this one (a sum is twice the tensor), noting every
    /// bucket it starts: its tensors' first values (the tests' tensor `i` holds `i`).
    struct Recorder(Arc<Mutex<Vec<Vec<f32>>>>);

    impl Collective for Recorder {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            Ok((t * 2.0)?)
        }
        fn all_reduce_start(&self, ts: Vec<Tensor>) -> Result<Box<dyn Pending>> {
            let firsts = ts
                .iter()
                .map(|t| Ok(t.flatten_all()?.get(0)?.to_scalar::<f32>()?))
                .collect::<Result<_>>()?;
            self.0.lock().unwrap().push(firsts);
            let sums = ts
                .iter()
                .map(|t| self.all_reduce_sum(t))
                .collect::<Result<_>>()?;
            Ok(Box::new(Done(sums)))
        }
    }

    #[test]
    fn buckets_fill_in_readiness_order_and_start_once_full() {
        // Tensor i holds i everywhere; sizes in f32 elements, pushed in a shuffled order.
        let sizes = [3usize, 10, 1, 7, 2, 2, 9, 4];
        let order = [5usize, 2, 7, 0, 6, 1, 3, 4];
        let dev = Device::Cpu;
        for cap in [1usize, 12, 40, 10_000] {
            let log = Arc::new(Mutex::new(Vec::new()));
            let group = Recorder(log.clone());
            let mut r = BucketReducer::new(&group, sizes.len(), cap);
            let mut started_while_pushing = 0;
            for &i in &order {
                r.push(i, Tensor::full(i as f32, sizes[i], &dev).unwrap())
                    .unwrap();
                started_while_pushing = r.buckets_started();
            }
            let sums = r.finish().unwrap();
            let buckets: Vec<Vec<usize>> = log
                .lock()
                .unwrap()
                .iter()
                .map(|b| b.iter().map(|&x| x as usize).collect())
                .collect();
            // Readiness order, every gradient in exactly one bucket.
            assert_eq!(buckets.concat(), order, "cap {cap}: {buckets:?}");
            for (k, b) in buckets.iter().enumerate() {
                let bytes: usize = b.iter().map(|&i| sizes[i] * 4).sum();
                let last = sizes[*b.last().unwrap()] * 4;
                if k + 1 < buckets.len() {
                    assert!(bytes >= cap && bytes - last < cap, "cap {cap}: {buckets:?}");
                } else {
                    assert!(bytes - last < cap, "cap {cap}: {buckets:?}");
                }
            }
            // Full buckets started while the gradients came; only the last one at the end.
            assert!(started_while_pushing >= buckets.len() - 1);
            match cap {
                1 => assert_eq!(buckets.len(), sizes.len()),
                10_000 => assert_eq!((buckets.len(), started_while_pushing), (1, 0)),
                _ => assert!(buckets.len() > 1 && buckets.len() < sizes.len()),
            }
            for (i, s) in sums.into_iter().enumerate() {
                let s = s.unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(s, vec![2.0 * i as f32; sizes[i]], "gradient {i}'s sum");
            }
        }
    }

    #[test]
    fn a_gradient_pushed_twice_or_never_is_caught() {
        let group = Recorder(Default::default());
        let t = || Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let mut r = BucketReducer::new(&group, 3, 1 << 20);
        r.push(1, t()).unwrap();
        assert!(r.push(1, t()).is_err());
        assert!(r.push(3, t()).is_err());
        assert!(r.push(0, t().to_dtype(DType::F64).unwrap()).is_err());
        let sums = r.finish().unwrap();
        assert!(sums[0].is_none() && sums[1].is_some() && sums[2].is_none());
    }

    /// Only `all_reduce_sum`: the default bucket call.
    struct Doubler;

    impl Collective for Doubler {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            Ok((t * 2.0)?)
        }
    }

    #[test]
    fn the_default_bucket_call_sums_each_tensor_in_order() {
        let dev = Device::Cpu;
        let ts: Vec<Tensor> = (0..3)
            .map(|i| Tensor::full(i as f32 + 1.0, i + 1, &dev).unwrap())
            .collect();
        let sums = Doubler.all_reduce_start(ts).unwrap().wait().unwrap();
        let got: Vec<Vec<f32>> = sums.iter().map(|t| t.to_vec1().unwrap()).collect();
        assert_eq!(got, vec![vec![2.0], vec![4.0; 2], vec![6.0; 3]]);
        assert_eq!(bucket_bytes(25.0), 25 << 20);
        assert_eq!(bucket_bytes(1e-12), 1);
    }

    #[test]
    fn zero1_owners_balance_the_ranks_and_cover_every_tensor_once() {
        let sizes = [100, 3, 50, 50, 7, 1, 100, 0];
        let o = zero1_owners(&sizes, 2);
        assert_eq!(o.len(), sizes.len());
        let load = |r| -> usize {
            (0..sizes.len())
                .filter(|&i| o[i] == r)
                .map(|i| sizes[i])
                .sum()
        };
        assert_eq!(load(0) + load(1), 311);
        assert!(load(0).abs_diff(load(1)) <= 7, "{} vs {}", load(0), load(1));
        // The two largest go to different ranks; every rank computes the same owners.
        assert_ne!(o[0], o[6]);
        assert_eq!(o, zero1_owners(&sizes, 2));
        assert!(zero1_owners(&sizes, 1).iter().all(|&r| r == 0));
        assert!(zero1_owners(&sizes, 3).iter().all(|&r| r < 3));
    }

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let m: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn launcher_variables() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 1));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("node0", 29500));
        let err = |v: &[(&str, &str)]| env(v).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]).contains("RANK=2")
        );
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_PORT"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")])
                .contains("MASTER_PORT")
        );
    }

    #[test]
    fn rank0_hands_out_the_id() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mk = |rank| DistEnv {
            rank,
            world_size: 3,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let id: Vec<u8> = (0..128u8).collect();
        let clients: Vec<_> = (1..3)
            .map(|r| {
                let e = mk(r);
                std::thread::spawn(move || exchange_bytes(&e, None, 128).unwrap())
            })
            .collect();
        let served = exchange_bytes(&mk(0), Some(&id), 128).unwrap();
        assert_eq!(served, id);
        for c in clients {
            assert_eq!(c.join().unwrap(), id);
        }
    }
}
