//! Row-wise temperature softmax and log-softmax, forward and backward.
//!
//! y = softmax(x / T) per row: a max pass, a sum-of-exponentials pass, and a
//! write pass (each row stays in cache between them).

use crate::element::Element;
use crate::error::{check_len, inverse_temperature, KernelError};
use crate::rows::{
    add_into, row_max, run_blocks, runs, shift, store, wide_sum, widen, widen_into, Blocking,
    PaddedRow, Wide,
};
use crate::simd::simd_dispatch;
use crate::simd::{exp_lanes, exp_nonpos_lanes, madd, Arch, SimdLevel};

/// Which of the two normalisations to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxKind {
    /// softmax(x / T)
    Softmax,
    /// log_softmax(x / T)
    LogSoftmax,
}

/// Maximum and log-partition of one row of x / T: log Z = log Σ exp((x - max) / T).
#[inline(always)]
pub(crate) fn row_log_partition<A: Arch, const L: usize, E: Element>(
    row: &[E],
    inv_t: f32,
) -> (f32, f64) {
    let max = row_max::<E, L>(row);
    let mut z: Wide<L> = [0.0; L];
    let padded = PaddedRow::<E, L>::new(row);
    for run in runs(padded.chunks()) {
        let mut z_run = [0.0; L];
        for k in run {
            let s = shift(padded.chunk(k), max, inv_t);
            add_into(&mut z_run, &exp_nonpos_lanes::<A, L>(&s));
        }
        widen_into(&mut z, &z_run);
    }
    (max, wide_sum(&z).ln())
}

#[inline(always)]
fn softmax_block<A: Arch, const L: usize, E: Element>(
    x: &[E],
    out: &mut [E],
    cols: usize,
    inv_t: f32,
    log: bool,
) {
    for (row, out_row) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let (max, log_z) = row_log_partition::<A, L, E>(row, inv_t);
        let log_z = log_z as f32;
        let inv_z = (-log_z).exp();
        let padded = PaddedRow::<E, L>::new(row);
        for k in 0..padded.chunks() {
            let s = shift(padded.chunk(k), max, inv_t);
            let mut y = [0.0; L];
            if log {
                for i in 0..L {
                    y[i] = s[i] - log_z;
                }
            } else {
                let e = exp_nonpos_lanes::<A, L>(&s);
                for i in 0..L {
                    y[i] = e[i] * inv_z;
                }
            }
            store(&mut out_row[padded.span(k)], &y);
        }
    }
}

#[inline(always)]
fn softmax_backward_block<A: Arch, const L: usize, E: Element>(
    y: &[E],
    grad_y: &[E],
    grad_x: &mut [E],
    cols: usize,
    inv_t: f32,
    log: bool,
) {
    let rows = y.chunks(cols).zip(grad_y.chunks(cols));
    for ((y_row, g_row), dx_row) in rows.zip(grad_x.chunks_mut(cols)) {
        // softmax: dx = y (g - Σ g y) / T;  log_softmax: dx = (g - e^y Σ g) / T
        let mut acc: Wide<L> = [0.0; L];
        let py = PaddedRow::<E, L>::filled(y_row, 0.0);
        let pg = PaddedRow::<E, L>::filled(g_row, 0.0);
        for run in runs(py.chunks()) {
            let mut acc_run = [0.0; L];
            for k in run {
                let (yv, gv) = (widen(py.chunk(k)), widen(pg.chunk(k)));
                for i in 0..L {
                    acc_run[i] = if log {
                        acc_run[i] + gv[i]
                    } else {
                        madd::<A>(gv[i], yv[i], acc_run[i])
                    };
                }
            }
            widen_into(&mut acc, &acc_run);
        }
        let total = wide_sum(&acc) as f32;
        for k in 0..py.chunks() {
            let (yv, gv) = (widen(py.chunk(k)), widen(pg.chunk(k)));
            let mut dx = [0.0; L];
            if log {
                // y is whatever the caller saved: use the general exp.
                let p = exp_lanes::<A, L>(&yv);
                for i in 0..L {
                    dx[i] = madd::<A>(-p[i], total, gv[i]) * inv_t;
                }
            } else {
                for i in 0..L {
                    dx[i] = yv[i] * (gv[i] - total) * inv_t;
                }
            }
            store(&mut dx_row[py.span(k)], &dx);
        }
    }
}

simd_dispatch!(fn softmax_block_at<E: Element>(x: &[E], out: &mut [E], cols: usize, inv_t: f32, log: bool) => softmax_block);
simd_dispatch!(fn softmax_backward_block_at<E: Element>(y: &[E], grad_y: &[E], grad_x: &mut [E], cols: usize, inv_t: f32, log: bool) => softmax_backward_block);

pub(crate) fn check_shape(rows: usize, cols: usize) -> Result<usize, KernelError> {
    if cols == 0 {
        return Err(KernelError::Parameter {
            what: "cols",
            message: "the vocabulary dimension must be >= 1".to_string(),
        });
    }
    rows.checked_mul(cols).ok_or(KernelError::Parameter {
        what: "rows x cols",
        message: "overflows usize".to_string(),
    })
}

/// `out = softmax(x / T)` (or log-softmax) over each row of a row-major
/// `rows x cols` matrix.
pub fn softmax<E: Element>(
    x: &[E],
    rows: usize,
    cols: usize,
    temperature: f32,
    kind: SoftmaxKind,
    out: &mut [E],
) -> Result<(), KernelError> {
    softmax_at(SimdLevel::detect(), x, rows, cols, temperature, kind, out)
}

/// [`softmax`] at a given SIMD level (tests run every level a CPU has).
#[doc(hidden)]
pub fn softmax_at<E: Element>(
    level: SimdLevel,
    x: &[E],
    rows: usize,
    cols: usize,
    temperature: f32,
    kind: SoftmaxKind,
    out: &mut [E],
) -> Result<(), KernelError> {
    let n = check_shape(rows, cols)?;
    check_len("x", x.len(), n)?;
    check_len("out", out.len(), n)?;
    let inv_t = inverse_temperature(temperature)?;
    let log = kind == SoftmaxKind::LogSoftmax;
    let blocking = Blocking::new(rows, cols);
    let len = blocking.rows_per_block * cols;
    let items: Vec<_> = x.chunks(len).zip(out.chunks_mut(len)).collect();
    run_blocks(items, |_, (xb, ob)| {
        softmax_block_at(level, xb, ob, cols, inv_t, log)
    });
    Ok(())
}

/// Gradient of [`softmax`] w.r.t. its input, given its output `y` and the
/// gradient `grad_y` of the output.
pub fn softmax_backward<E: Element>(
    y: &[E],
    grad_y: &[E],
    rows: usize,
    cols: usize,
    temperature: f32,
    kind: SoftmaxKind,
    grad_x: &mut [E],
) -> Result<(), KernelError> {
    softmax_backward_at(
        SimdLevel::detect(),
        y,
        grad_y,
        rows,
        cols,
        temperature,
        kind,
        grad_x,
    )
}

/// [`softmax_backward`] at a given SIMD level (tests run every level a CPU has).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn softmax_backward_at<E: Element>(
    level: SimdLevel,
    y: &[E],
    grad_y: &[E],
    rows: usize,
    cols: usize,
    temperature: f32,
    kind: SoftmaxKind,
    grad_x: &mut [E],
) -> Result<(), KernelError> {
    let n = check_shape(rows, cols)?;
    check_len("y", y.len(), n)?;
    check_len("grad_y", grad_y.len(), n)?;
    check_len("grad_x", grad_x.len(), n)?;
    let inv_t = inverse_temperature(temperature)?;
    let log = kind == SoftmaxKind::LogSoftmax;
    let blocking = Blocking::new(rows, cols);
    let len = blocking.rows_per_block * cols;
    let items: Vec<_> = y
        .chunks(len)
        .zip(grad_y.chunks(len))
        .zip(grad_x.chunks_mut(len))
        .collect();
    run_blocks(items, |_, ((yb, gb), db)| {
        softmax_backward_block_at(level, yb, gb, db, cols, inv_t, log)
    });
    Ok(())
}
