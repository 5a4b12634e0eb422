//! Helpers shared by the row kernels: widening loads and narrowing stores of
//! lane chunks, lane reductions, and the parallel loop over blocks of rows.

use rayon::prelude::*;

use crate::element::Element;
use crate::pool;
use crate::simd::{Lanes, LANES};

/// Below this many elements a call runs on the calling thread: waking the
/// pool costs more than the work (a 1 x 8 call must take microseconds).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

// The partial-chunk paths below index their lane arrays with constants only
// (a fixed-length loop over the lanes with a bounds test on the slice): an array indexed by
// a run-time length must live in memory, and the hot full-chunk path would
// then go through the stack too (store-forwarding stalls measured at ~25% of
// the KL kernel's time).

/// Widens `src` (at most `LANES` long) to f32, padding with `fill`.
#[inline(always)]
pub(crate) fn load<E: Element>(src: &[E], fill: f32) -> Lanes {
    let mut v = [fill; LANES];
    if let Ok(full) = <&[E; LANES]>::try_from(src) {
        for i in 0..LANES {
            v[i] = full[i].to_f32();
        }
    } else {
        for (i, lane) in v.iter_mut().enumerate() {
            if let Some(x) = src.get(i) {
                *lane = x.to_f32();
            }
        }
    }
    v
}

/// (x − max) / T for one chunk of at most `LANES`, widened; padding lanes are
/// −inf. (One loop for load and shift: a bare widening load of f32 compiles
/// to a memcpy through the stack.)
#[inline(always)]
pub(crate) fn load_shifted<E: Element>(src: &[E], max: f32, inv_t: f32) -> Lanes {
    let mut v = [f32::NEG_INFINITY; LANES];
    if let Ok(full) = <&[E; LANES]>::try_from(src) {
        for i in 0..LANES {
            v[i] = (full[i].to_f32() - max) * inv_t;
        }
    } else {
        for (i, lane) in v.iter_mut().enumerate() {
            if let Some(x) = src.get(i) {
                *lane = (x.to_f32() - max) * inv_t;
            }
        }
    }
    v
}

/// Narrows the first `dst.len()` (at most `LANES`) lanes into `dst`.
#[inline(always)]
pub(crate) fn store<E: Element>(dst: &mut [E], v: &Lanes) {
    if let Ok(full) = <&mut [E; LANES]>::try_from(&mut *dst) {
        for i in 0..LANES {
            full[i] = E::from_f32(v[i]);
        }
    } else {
        for (i, x) in v.iter().enumerate() {
            if let Some(d) = dst.get_mut(i) {
                *d = E::from_f32(*x);
            }
        }
    }
}

#[inline(always)]
pub(crate) fn add_into(acc: &mut Lanes, v: &Lanes) {
    for i in 0..LANES {
        acc[i] += v[i];
    }
}

#[inline(always)]
pub(crate) fn lane_max(v: &Lanes) -> f32 {
    v.iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Elements summed in f32 lanes before the lane sums are widened to f64.
/// Plain f32 lanes over a 32k-wide row lose ~1e-6 absolute in log Z, which is
/// 1e-4 of a small KL; runs keep f64 accuracy at nearly f32 cost.
pub(crate) const RUN: usize = 32 * LANES;

/// Lane sums in f64, fed one run at a time.
pub(crate) type Wide = [f64; LANES];

#[inline(always)]
pub(crate) fn widen_into(acc: &mut Wide, v: &Lanes) {
    for i in 0..LANES {
        acc[i] += v[i] as f64;
    }
}

#[inline(always)]
pub(crate) fn wide_sum(v: &Wide) -> f64 {
    v.iter().sum()
}

/// Maximum of a row, widened to f32.
#[inline(always)]
pub(crate) fn row_max<E: Element>(row: &[E]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        let full: &[E; LANES] = chunk.try_into().expect("chunks_exact gives LANES");
        for i in 0..LANES {
            let x = full[i].to_f32();
            acc[i] = if x > acc[i] { x } else { acc[i] };
        }
    }
    let tail = chunks.remainder();
    for (i, a) in acc.iter_mut().enumerate() {
        if let Some(x) = tail.get(i) {
            let x = x.to_f32();
            *a = if x > *a { x } else { *a };
        }
    }
    lane_max(&acc)
}

/// An output buffer of `rows x cols`, possibly absent, split into blocks.
pub(crate) fn split_rows<E>(
    buf: Option<&mut [E]>,
    block_len: usize,
    blocks: usize,
) -> Vec<Option<&mut [E]>> {
    match buf {
        Some(b) => b.chunks_mut(block_len).map(Some).collect(),
        None => (0..blocks).map(|_| None).collect(),
    }
}

/// How `rows` rows of `cols` are cut into blocks for the pool.
pub(crate) struct Blocking {
    pub rows_per_block: usize,
    pub blocks: usize,
}

impl Blocking {
    pub fn new(rows: usize, cols: usize) -> Blocking {
        let rows_per_block = if rows.saturating_mul(cols) < PARALLEL_MIN_ELEMENTS {
            rows.max(1)
        } else {
            // A few blocks per thread balance uneven rows (-inf heavy, etc.).
            rows.div_ceil(pool::num_threads() * 4).max(1)
        };
        Blocking {
            rows_per_block,
            blocks: rows.div_ceil(rows_per_block),
        }
    }
}

/// Runs `work(block_index, item)` for each item, in the pool when there is
/// more than one block.
pub(crate) fn run_blocks<T: Send>(items: Vec<T>, work: impl Fn(usize, T) + Sync + Send) {
    if items.len() <= 1 {
        for (i, item) in items.into_iter().enumerate() {
            work(i, item);
        }
    } else {
        pool::install(|| {
            items
                .into_par_iter()
                .enumerate()
                .for_each(|(i, item)| work(i, item))
        });
    }
}
