//! Fused-loss kernels against the memory floor, timed in one process.
//!
//! `cargo run --release --example floor_ratio -- [threads] [repeat]`
//!
//! The floor is one pass that reads the student and teacher logits and writes
//! one tensor of the same shape and dtype (out = s + t into a buffer written
//! before, so no page faults): the least traffic a forward + backward that
//! returns the student's gradient must move. Each kernel is timed in rounds
//! interleaved with the floor; medians and their ratio are printed.

use std::hint::black_box;
use std::time::Instant;

use half::bf16;
use kdcore_kernels::{distill, pool, Divergence, Element, Grads};

#[path = "../benches/common/floor.rs"]
mod common_floor;
use common_floor::floor;

fn logits<E: Element>(rows: usize, cols: usize, seed: u64) -> Vec<E> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..rows * cols)
        .map(|i| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            let u = ((x >> 32) as f32 + (x & 0xFFFF_FFFF) as f32) * (1.0 / 4_294_967_296.0);
            E::from_f32(3.0 * (u - 1.0) + ((i / cols) % 17) as f32 - 8.0)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run<E: Element>(rows: usize, cols: usize, threads: usize, repeat: usize) {
    let s: Vec<E> = logits(rows, cols, 1);
    let t: Vec<E> = logits(rows, cols, 2);
    let mut out = vec![E::from_f32(0.0); rows * cols];
    let mut grad = vec![E::from_f32(0.0); rows * cols];
    let weight = vec![1.0f32; rows];
    let mut loss = vec![0.0f32; rows];
    let labels: Vec<i64> = (0..rows as i64).map(|r| (r * 7919) % cols as i64).collect();
    let ce_weight = vec![0.5f32; rows];
    let mut ce_loss = vec![0.0f32; rows];
    let kinds: [(&str, Divergence, bool); 4] = [
        ("kl", Divergence::Kl, false),
        ("jsd", Divergence::Jsd { beta: 0.5 }, false),
        ("distill", Divergence::Kl, true),
        ("tvd", Divergence::Tvd, false),
    ];
    // FLOOR_RATIO_ONLY=kl times one kernel (for profiling).
    let only = std::env::var("FLOOR_RATIO_ONLY").ok();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len() + 1];
    for round in 0..repeat + 2 {
        let start = Instant::now();
        floor(&s, &t, &mut out, threads);
        black_box(&mut out);
        let floor_ms = start.elapsed().as_secs_f64() * 1e3;
        if round >= 2 {
            times[0].push(floor_ms);
        }
        for (k, &(name, div, hard)) in kinds.iter().enumerate() {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let start = Instant::now();
            let hard = hard.then(|| kdcore_kernels::HardLabels {
                labels: &labels,
                weight: &ce_weight,
                loss: &mut ce_loss,
            });
            distill(
                &s,
                &t,
                rows,
                cols,
                div,
                2.0,
                &weight,
                &mut loss,
                hard,
                Grads {
                    student: Some(&mut grad),
                    teacher: None,
                },
            )
            .unwrap();
            black_box(&mut grad);
            if round >= 2 {
                times[k + 1].push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let floor_ms = median(times[0].clone());
    print!(
        "{rows}x{cols} {:>4} threads {threads}: floor {floor_ms:6.2} ms",
        E::NAME
    );
    for (k, (name, _, _)) in kinds.iter().enumerate() {
        if times[k + 1].is_empty() {
            continue;
        }
        let ms = median(times[k + 1].clone());
        print!(" | {name} {ms:6.2} ms {:.2}x", ms / floor_ms);
    }
    println!();
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let threads = args.first().copied().unwrap_or(2);
    let repeat = args.get(1).copied().unwrap_or(15);
    pool::set_num_threads(threads).unwrap();
    if std::env::var_os("FLOOR_RATIO_SMALL").is_some() {
        // Cache-resident: the kernels' compute alone.
        run::<f32>(4, 32_000, threads, repeat * 20);
        run::<bf16>(4, 32_000, threads, repeat * 20);
        return;
    }
    run::<f32>(512, 32_000, threads, repeat);
    run::<f32>(256, 128_256, threads, repeat);
    run::<bf16>(512, 32_000, threads, repeat);
}
