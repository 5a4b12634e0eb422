//! `kdcore._native`: the thin Python binding of `kdcore-kernels`.
//!
//! It only validates arguments, views numpy buffers as typed slices, and
//! releases the GIL around kernel calls. 16-bit tensors arrive as `int16`
//! views (numpy has no bfloat16) together with the name of their real dtype.

mod arrays;

use kdcore_kernels::{self as kernels, KernelError, KlGrads, SoftmaxKind};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use arrays::{typed_input_like, typed_like, with_input, Input, Output};

fn to_py(err: KernelError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

fn kind(log: bool) -> SoftmaxKind {
    if log {
        SoftmaxKind::LogSoftmax
    } else {
        SoftmaxKind::Softmax
    }
}

/// out = softmax(x / temperature) (or log_softmax) over the last axis of 2-D `x`.
#[pyfunction]
#[pyo3(signature = (x, out, dtype, temperature, log))]
fn softmax(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    dtype: &str,
    temperature: f32,
    log: bool,
) -> PyResult<()> {
    let x = Input::extract("x", x, dtype)?;
    let mut out = Output::extract("out", out, dtype)?;
    arrays::same_shape(("x", x.shape()), ("out", out.shape()))?;
    let (rows, cols) = x.shape();
    let (xs, os) = (x.slice()?, out.slice()?);
    with_input!(xs, |xv| {
        let ov = typed_like(xv, os)?;
        py.detach(|| kernels::softmax(xv, rows, cols, temperature, kind(log), ov))
            .map_err(to_py)
    })
}

/// grad_x of softmax (or log_softmax) from its output `y` and `grad_y`.
#[pyfunction]
#[pyo3(signature = (y, grad_y, grad_x, dtype, temperature, log))]
fn softmax_backward(
    py: Python<'_>,
    y: &Bound<'_, PyAny>,
    grad_y: &Bound<'_, PyAny>,
    grad_x: &Bound<'_, PyAny>,
    dtype: &str,
    temperature: f32,
    log: bool,
) -> PyResult<()> {
    let y = Input::extract("y", y, dtype)?;
    let g = Input::extract("grad_y", grad_y, dtype)?;
    let mut dx = Output::extract("grad_x", grad_x, dtype)?;
    arrays::same_shape(("y", y.shape()), ("grad_y", g.shape()))?;
    arrays::same_shape(("y", y.shape()), ("grad_x", dx.shape()))?;
    let (rows, cols) = y.shape();
    let (ys, gs, ds) = (y.slice()?, g.slice()?, dx.slice()?);
    with_input!(ys, |yv| {
        let gv = typed_input_like(yv, gs)?;
        let dv = typed_like(yv, ds)?;
        py.detach(|| kernels::softmax_backward(yv, gv, rows, cols, temperature, kind(log), dv))
            .map_err(to_py)
    })
}

/// Per-row weighted KL(softmax(p / T) ‖ softmax(q / T)) into `loss`, and the
/// gradients of its sum into `grad_p` / `grad_q` when they are given.
#[pyfunction]
#[pyo3(signature = (p, p_dtype, q, q_dtype, temperature, weight, loss, grad_p=None, grad_q=None))]
#[allow(clippy::too_many_arguments)]
fn kl_div(
    py: Python<'_>,
    p: &Bound<'_, PyAny>,
    p_dtype: &str,
    q: &Bound<'_, PyAny>,
    q_dtype: &str,
    temperature: f32,
    weight: numpy::PyReadonlyArray1<'_, f32>,
    mut loss: numpy::PyReadwriteArray1<'_, f32>,
    grad_p: Option<&Bound<'_, PyAny>>,
    grad_q: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let p = Input::extract("p", p, p_dtype)?;
    let q = Input::extract("q", q, q_dtype)?;
    arrays::same_shape(("p", p.shape()), ("q", q.shape()))?;
    let (rows, cols) = p.shape();
    let mut gp = grad_p
        .map(|g| Output::extract("grad_p", g, p_dtype))
        .transpose()?;
    let mut gq = grad_q
        .map(|g| Output::extract("grad_q", g, q_dtype))
        .transpose()?;
    for g in [gp.as_ref(), gq.as_ref()].into_iter().flatten() {
        arrays::same_shape(("p", p.shape()), (g.name(), g.shape()))?;
    }
    let weight = arrays::contiguous("weight", weight.as_slice())?;
    let loss = arrays::contiguous("loss", loss.as_slice_mut())?;
    let (ps, qs) = (p.slice()?, q.slice()?);
    let gps = gp.as_mut().map(|g| g.slice()).transpose()?;
    let gqs = gq.as_mut().map(|g| g.slice()).transpose()?;
    with_input!(ps, |pv| with_input!(qs, |qv| {
        let gpv = gps.map(|g| typed_like(pv, g)).transpose()?;
        let gqv = gqs.map(|g| typed_like(qv, g)).transpose()?;
        let grads = KlGrads { p: gpv, q: gqv };
        py.detach(|| kernels::kl_div(pv, qv, rows, cols, temperature, weight, loss, grads))
            .map_err(to_py)
    }))
}

/// Sets the size of kdcore's own thread pool.
#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    let n = usize::try_from(n)
        .map_err(|_| PyValueError::new_err(format!("num_threads must be >= 1, got {n}")))?;
    kernels::pool::set_num_threads(n).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The size of kdcore's thread pool.
#[pyfunction]
fn get_num_threads() -> usize {
    kernels::pool::num_threads()
}

/// The SIMD instruction set the kernels run with on this CPU.
#[pyfunction]
fn simd_level() -> &'static str {
    kernels::SimdLevel::detect().name()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(softmax, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kl_div, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    Ok(())
}
