//! Criterion benches of the kernel crate: softmax forward, fused KL forward
//! and forward + gradients at LLM vocabulary sizes, and the vectorised exp at
//! every SIMD level.
//!
//! `cargo bench` (all of it takes a few minutes on 2 cores); one group:
//! `cargo bench -- kl_div_fwd_grad`. Sample sizes are small on purpose: the
//! shapes are large (up to 33M elements per call) and these numbers are for
//! tracking, not for ratios against other libraries (see benches/*.py).
//! Threads: kdcore's pool (`KDCORE_NUM_THREADS`, else every CPU).
//! `student_grad_vs_floor` puts the fused KL with the student's gradient (what
//! `kdcore.kl_loss` runs) next to the memory floor on the same shape: one
//! pass reading both logit rows and writing one row, split over as many
//! threads (docs/benchmarks.md). `examples/floor_ratio.rs` prints the ratios.

use std::hint::black_box;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use half::bf16;
use kdcore_kernels::simd::{exp_slice, SimdLevel};
use kdcore_kernels::{kl_div, pool, softmax, Element, KlGrads, SoftmaxKind};

#[path = "common/floor.rs"]
mod common_floor;
use common_floor::floor;

/// (rows, vocabulary): a Llama-2 sized and a Llama-3 sized vocabulary.
const SHAPES: [(usize, usize); 2] = [(512, 32_000), (256, 128_256)];

/// Deterministic logits, roughly N(0, 2)-shaped (sum of uniforms), with a
/// per-row offset so rows differ in their maxima.
fn logits<E: Element>(rows: usize, cols: usize, seed: u64) -> Vec<E> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // Two 32-bit uniforms in [0, 1), summed: triangular on [0, 2).
        ((x >> 32) as f32 + (x & 0xFFFF_FFFF) as f32) * (1.0 / 4_294_967_296.0)
    };
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let offset = (r % 17) as f32 - 8.0;
        for _ in 0..cols {
            out.push(E::from_f32(3.0 * (next() - 1.0) + offset));
        }
    }
    out
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sampling_mode(SamplingMode::Flat);
}

fn bench_softmax_dtype<E: Element>(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax_fwd");
    configure(&mut group);
    for (rows, cols) in SHAPES {
        let x: Vec<E> = logits(rows, cols, 1);
        let mut out = vec![E::from_f32(0.0); rows * cols];
        group.throughput(Throughput::Elements((rows * cols) as u64));
        let id = BenchmarkId::new(E::NAME, format!("{rows}x{cols}"));
        group.bench_function(id, |b| {
            b.iter(|| {
                softmax(
                    black_box(&x),
                    rows,
                    cols,
                    1.0,
                    SoftmaxKind::Softmax,
                    &mut out,
                )
                .unwrap();
                black_box(&mut out);
            })
        });
    }
    group.finish();
}

fn bench_softmax(c: &mut Criterion) {
    eprintln!(
        "kdcore kernels: SIMD level {}, {} threads",
        SimdLevel::detect().name(),
        pool::num_threads()
    );
    bench_softmax_dtype::<f32>(c);
    bench_softmax_dtype::<bf16>(c);
}

/// One timed KL(p ‖ q) at T = 2 with the gradients `g` asks for.
fn timed_kl<E: Element>(
    p: &[E],
    q: &[E],
    rows: usize,
    cols: usize,
    w: &[f32],
    loss: &mut [f32],
    g: KlGrads<'_, E, E>,
) {
    kl_div(black_box(p), black_box(q), rows, cols, 2.0, w, loss, g).unwrap();
    black_box(loss);
}

/// Teacher p and student q of one dtype; `grads` asks for both gradients.
fn bench_kl_dtype<E: Element>(c: &mut Criterion, grads: bool) {
    let name = if grads {
        "kl_div_fwd_grad"
    } else {
        "kl_div_fwd"
    };
    let mut group = c.benchmark_group(name);
    configure(&mut group);
    for (rows, cols) in SHAPES {
        let n = rows * cols;
        let p: Vec<E> = logits(rows, cols, 2);
        let q: Vec<E> = logits(rows, cols, 3);
        let w = vec![1.0f32; rows];
        let mut loss = vec![0.0f32; rows];
        let (mut gp, mut gq) = if grads {
            (vec![E::from_f32(0.0); n], vec![E::from_f32(0.0); n])
        } else {
            (Vec::new(), Vec::new())
        };
        group.throughput(Throughput::Elements(n as u64));
        let id = BenchmarkId::new(E::NAME, format!("{rows}x{cols}"));
        group.bench_function(id, |b| {
            b.iter(|| {
                let g = if grads {
                    KlGrads {
                        p: Some(&mut gp[..]),
                        q: Some(&mut gq[..]),
                    }
                } else {
                    KlGrads { p: None, q: None }
                };
                timed_kl(&p, &q, rows, cols, &w, &mut loss, g);
            })
        });
    }
    group.finish();
}

fn bench_floor_dtype<E: Element>(c: &mut Criterion) {
    let mut group = c.benchmark_group("student_grad_vs_floor");
    configure(&mut group);
    let threads = pool::num_threads();
    for (rows, cols) in SHAPES {
        let n = rows * cols;
        let p: Vec<E> = logits(rows, cols, 2);
        let q: Vec<E> = logits(rows, cols, 3);
        let w = vec![1.0f32; rows];
        let mut loss = vec![0.0f32; rows];
        // Written once before timing, as kdcore's recycled gradient buffers are.
        let mut out = vec![E::from_f32(0.0); n];
        group.throughput(Throughput::Elements(n as u64));
        let shape = format!("{rows}x{cols}");
        group.bench_function(
            BenchmarkId::new(format!("floor/{}", E::NAME), &shape),
            |b| {
                b.iter(|| {
                    floor(black_box(&p), black_box(&q), &mut out, threads);
                    black_box(&mut out);
                })
            },
        );
        group.bench_function(BenchmarkId::new(format!("kl/{}", E::NAME), &shape), |b| {
            b.iter(|| {
                let g = KlGrads {
                    p: None,
                    q: Some(&mut out[..]),
                };
                timed_kl(&p, &q, rows, cols, &w, &mut loss, g);
            })
        });
    }
    group.finish();
}

fn bench_floor(c: &mut Criterion) {
    bench_floor_dtype::<f32>(c);
    bench_floor_dtype::<bf16>(c);
}

fn bench_kl(c: &mut Criterion) {
    bench_kl_dtype::<f32>(c, false);
    bench_kl_dtype::<bf16>(c, false);
    bench_kl_dtype::<f32>(c, true);
    bench_kl_dtype::<bf16>(c, true);
}

/// One thread, 1M values in [-90, 90] (all branches of the clamp), per level.
fn bench_exp(c: &mut Criterion) {
    const N: usize = 1 << 20;
    let xs: Vec<f32> = (0..N)
        .map(|i| ((i as u64 * 2_654_435_761) % 1_000_003) as f32 * (180.0 / 1_000_003.0) - 90.0)
        .collect();
    let mut out = vec![0.0f32; N];
    let mut group = c.benchmark_group("exp_slice");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(N as u64));
    for level in SimdLevel::available() {
        group.bench_function(level.name(), |b| {
            b.iter(|| {
                exp_slice(level, black_box(&xs), &mut out).unwrap();
                black_box(&mut out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_softmax, bench_kl, bench_floor, bench_exp);
criterion_main!(benches);
