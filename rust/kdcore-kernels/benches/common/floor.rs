//! The memory floor of a fused forward + backward, shared by the criterion
//! bench and the `floor_ratio` example.

use std::sync::OnceLock;

use kdcore_kernels::Element;
use rayon::prelude::*;

/// A pool of `threads` persistent workers, made on first use. Threads spawned
/// per call (as this floor once did) start wherever the scheduler puts them:
/// the floor then ran at two speeds from run to run (9.8 or 15 ms at
/// 512 x 32000 f32 on two threads), and `torch.add` beat it.
fn pool(threads: usize) -> &'static rayon::ThreadPool {
    static POOL: OnceLock<(usize, rayon::ThreadPool)> = OnceLock::new();
    let (made_for, pool) = POOL.get_or_init(|| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool for the floor");
        (threads, pool)
    });
    assert_eq!(*made_for, threads, "one floor thread count per process");
    pool
}

/// out = s + t on `threads` workers, one contiguous share each: the least
/// traffic of a forward + backward (read both logits, write one gradient).
pub fn floor<E: Element>(s: &[E], t: &[E], out: &mut [E], threads: usize) {
    let len = s.len().div_ceil(threads).max(1);
    pool(threads).install(|| {
        out.par_chunks_mut(len)
            .zip(s.par_chunks(len))
            .zip(t.par_chunks(len))
            .for_each(|((oc, sc), tc)| {
                for ((o, a), b) in oc.iter_mut().zip(sc).zip(tc) {
                    *o = E::from_f32(a.to_f32() + b.to_f32());
                }
            });
    });
}
