//! Helpers shared by the row kernels: rows as padded lane chunks, widening
//! loads and narrowing stores, lane reductions, and the parallel loop over
//! blocks of rows.

use rayon::prelude::*;

use crate::element::Element;
use crate::pool;
use crate::simd::Lanes;

/// Below this many elements a call runs on the calling thread: waking the
/// pool costs more than the work (a 1 x 8 call must take microseconds).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

// `L` below: the lane count of the SIMD level a kernel is compiled for
// (chosen by `simd_dispatch!`).

/// One full chunk, widened to f32.
#[inline(always)]
pub(crate) fn widen<E: Element, const L: usize>(src: &[E; L]) -> Lanes<L> {
    std::array::from_fn(|i| src[i].to_f32())
}

/// (x − max) / T for one full chunk, widened.
#[inline(always)]
pub(crate) fn shift<E: Element, const L: usize>(src: &[E; L], max: f32, inv_t: f32) -> Lanes<L> {
    std::array::from_fn(|i| (src[i].to_f32() - max) * inv_t)
}

/// The chunk indices `0..chunks` in runs of [`CHUNKS_PER_RUN`] chunks: lane
/// sums are kept in f32 within a run and widened to f64 after it.
#[inline(always)]
pub(crate) fn runs(chunks: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..chunks)
        .step_by(CHUNKS_PER_RUN)
        .map(move |start| start..(start + CHUNKS_PER_RUN).min(chunks))
}

/// A row seen as full lane chunks: chunk k is the row's own memory, except a
/// partial last chunk, which is a copy padded with −inf (probability 0 after
/// the shift). Loop bodies so never handle a short chunk, whose run-time
/// length would push their lane arrays through the stack.
pub(crate) struct PaddedRow<'a, E, const L: usize> {
    row: &'a [E],
    full: usize,
    tail: [E; L],
}

impl<'a, E: Element, const L: usize> PaddedRow<'a, E, L> {
    #[inline(always)]
    pub fn new(row: &'a [E]) -> Self {
        Self::filled(row, f32::NEG_INFINITY)
    }

    /// Padding with `fill` instead of −inf.
    #[inline(always)]
    pub fn filled(row: &'a [E], fill: f32) -> Self {
        let full = row.len() / L;
        let mut tail = [E::from_f32(fill); L];
        let rest = &row[full * L..];
        tail[..rest.len()].copy_from_slice(rest);
        PaddedRow { row, full, tail }
    }

    /// Number of chunks, the padded one included.
    #[inline(always)]
    pub fn chunks(&self) -> usize {
        self.row.len().div_ceil(L)
    }

    /// The element range of chunk k within the row (shorter for the last).
    #[inline(always)]
    pub fn span(&self, k: usize) -> std::ops::Range<usize> {
        k * L..((k + 1) * L).min(self.row.len())
    }

    #[inline(always)]
    pub fn chunk(&self, k: usize) -> &[E; L] {
        if k < self.full {
            self.row[k * L..(k + 1) * L]
                .try_into()
                .expect("a chunk is L long")
        } else {
            &self.tail
        }
    }
}

/// Narrows the first `dst.len()` (at most `L`) lanes into `dst`.
///
/// The partial path indexes `v` with constants only (a fixed-length loop with
/// a bounds test on `dst`): a lane array indexed by a run-time length must
/// live in memory, and the full-chunk path would then go through the stack
/// too.
#[inline(always)]
pub(crate) fn store<E: Element, const L: usize>(dst: &mut [E], v: &Lanes<L>) {
    if let Ok(full) = <&mut [E; L]>::try_from(&mut *dst) {
        for i in 0..L {
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
pub(crate) fn add_into<const L: usize>(acc: &mut Lanes<L>, v: &Lanes<L>) {
    for i in 0..L {
        acc[i] += v[i];
    }
}

#[inline(always)]
pub(crate) fn lane_max<const L: usize>(v: &Lanes<L>) -> f32 {
    v.iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Chunks summed in f32 lanes before the lane sums are widened to f64: 32
/// f32 additions per lane at every width (a run is `32 * L` elements).
/// Plain f32 lanes over a 32k-wide row lose ~1e-6 absolute in log Z, which is
/// 1e-4 of a small KL; runs keep f64 accuracy at nearly f32 cost.
pub(crate) const CHUNKS_PER_RUN: usize = 32;

/// Lane sums in f64, fed one run at a time.
pub(crate) type Wide<const L: usize> = [f64; L];

#[inline(always)]
pub(crate) fn widen_into<const L: usize>(acc: &mut Wide<L>, v: &Lanes<L>) {
    for i in 0..L {
        acc[i] += v[i] as f64;
    }
}

#[inline(always)]
pub(crate) fn wide_sum<const L: usize>(v: &Wide<L>) -> f64 {
    v.iter().sum()
}

/// Bytes of one cache line (64 on every x86-64 and most aarch64 cores; a
/// wrong guess only changes how many hints are issued).
const LINE: usize = 64;

/// Hints the CPU to bring the cache lines of chunk `k` (of `L` elements) of
/// `row` into L2.
///
/// The row kernels read a row from memory once (its maxima) and then work on
/// it from cache: without a hint those phases alternate, waiting on memory
/// and then computing. Hinting the next row (and the gradient row about to
/// be written) while a row's exponentials are computed overlaps the two. A
/// hint never faults: `row` may be empty or shorter than the chunk.
#[inline(always)]
pub(crate) fn prefetch_chunk<E, const L: usize>(row: &[E], k: usize) {
    if row.is_empty() {
        return;
    }
    let bytes = L * std::mem::size_of::<E>();
    let start = (row.as_ptr() as *const u8).wrapping_add(k * bytes);
    for offset in (0..bytes).step_by(LINE) {
        prefetch_l2(start.wrapping_add(offset));
    }
}

#[inline(always)]
fn prefetch_l2(_p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unused_unsafe)]
    // SAFETY: a prefetch is only a hint: it never faults and has no
    // architectural effect, whatever the address (SSE, baseline on x86-64).
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        _mm_prefetch::<_MM_HINT_T1>(_p as *const i8)
    }
}

/// Maximum of a row, widened to f32.
#[inline(always)]
pub(crate) fn row_max<E: Element, const L: usize>(row: &[E]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for chunk in &mut chunks {
        let full: &[E; L] = chunk.try_into().expect("chunks_exact gives L");
        for i in 0..L {
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
