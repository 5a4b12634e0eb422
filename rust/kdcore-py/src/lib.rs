//! `kdcore._native`: the thin Python binding of `kdcore-kernels`.
//!
//! It only validates arguments, views the tensors' memory as typed slices,
//! and runs the kernels. Tensors arrive as DLPack capsules (the cheapest
//! handover, see [`dlpack`]) or as numpy arrays, 16-bit ones as `int16`
//! views (numpy has no bfloat16), together with the name of their real dtype.
//!
//! The GIL stays held while a kernel reads memory Python owns: a Python
//! thread could otherwise move an input's storage under the kernel
//! (`share_memory_()` copies it to shared memory and frees the old pages).
//! The kernel itself runs on kdcore's own pool, which never touches Python.
//! A kernel panic becomes a `RuntimeError` (see [`run_kernel`]).

mod arrays;
mod dlpack;

use kdcore_kernels::{
    self as kernels, Divergence, Grads, HardLabels, KernelError, SoftmaxKind, SparseTeacher, Tail,
};
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use arrays::{typed_input_like, typed_like, with_input, Input, Output, Weights};
use dlpack::disjoint;

fn to_py(err: KernelError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Runs a kernel call, turning a panic (a bug, or memory changed by another
/// thread during the call) into a `RuntimeError` rather than pyo3's
/// `PanicException`, which `except Exception` does not catch. The kernels
/// keep no state a panic could leave half-written (their scratch buffers are
/// dropped on unwind), so later calls are unaffected.
fn run_kernel(call: impl FnOnce() -> Result<(), KernelError>) -> PyResult<()> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(to_py),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(PyRuntimeError::new_err(format!(
                "kdcore kernel failed ({what}); the outputs of this call are invalid. \
                 Was an input changed by another thread during the call?"
            )))
        }
    }
}

/// The bytes of a numpy array's contiguous buffer (empty when it is not
/// contiguous: its own `as_slice` check then gives the error).
fn bytes_of<T, E>(slice: Result<&[T], E>) -> std::ops::Range<usize> {
    match slice {
        Ok(s) => {
            let start = s.as_ptr() as usize;
            start..start + std::mem::size_of_val(s)
        }
        Err(_) => 0..0,
    }
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
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    dtype: &str,
    temperature: f32,
    log: bool,
) -> PyResult<()> {
    let x = Input::extract("x", x, dtype)?;
    let mut out = Output::extract("out", out, dtype)?;
    arrays::same_shape(("x", x.shape()), ("out", out.shape()))?;
    disjoint(&[("x", x.bytes(), false), ("out", out.bytes(), true)])?;
    let (rows, cols) = x.shape();
    let (xs, os) = (x.slice()?, out.slice()?);
    with_input!(xs, |xv| {
        let ov = typed_like(xv, os)?;
        run_kernel(|| kernels::softmax(xv, rows, cols, temperature, kind(log), ov))
    })
}

/// grad_x of softmax (or log_softmax) from its output `y` and `grad_y`.
#[pyfunction]
#[pyo3(signature = (y, grad_y, grad_x, dtype, temperature, log))]
fn softmax_backward(
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
    disjoint(&[
        ("y", y.bytes(), false),
        ("grad_y", g.bytes(), false),
        ("grad_x", dx.bytes(), true),
    ])?;
    let (rows, cols) = y.shape();
    let (ys, gs, ds) = (y.slice()?, g.slice()?, dx.slice()?);
    with_input!(ys, |yv| {
        let gv = typed_input_like(yv, gs)?;
        let dv = typed_like(yv, ds)?;
        run_kernel(|| kernels::softmax_backward(yv, gv, rows, cols, temperature, kind(log), dv))
    })
}

fn divergence(name: &str, beta: f64) -> PyResult<Divergence> {
    match name {
        "kl" => Ok(Divergence::Kl),
        "reverse_kl" => Ok(Divergence::ReverseKl),
        "tvd" => Ok(Divergence::Tvd),
        "jsd" => Ok(Divergence::Jsd { beta }),
        other => Err(PyValueError::new_err(format!(
            "divergence must be kl, reverse_kl, tvd or jsd, got {other}"
        ))),
    }
}

/// Per-row weighted divergence between softmax(teacher / T) and
/// softmax(student / T) into `loss`, the hard-label CE into `ce_loss` when
/// labels are given, and the gradients of their sum into `grad_student` /
/// `grad_teacher` when those are given.
#[pyfunction]
#[pyo3(signature = (
    student, student_dtype, teacher, teacher_dtype, divergence_name, beta, temperature, weight,
    loss, labels=None, ce_weight=None, ce_loss=None, grad_student=None, grad_teacher=None,
))]
#[allow(clippy::too_many_arguments)]
fn distill(
    student: &Bound<'_, PyAny>,
    student_dtype: &str,
    teacher: &Bound<'_, PyAny>,
    teacher_dtype: &str,
    divergence_name: &str,
    beta: f64,
    temperature: f32,
    weight: &Bound<'_, PyAny>,
    mut loss: PyReadwriteArray1<'_, f32>,
    labels: Option<PyReadonlyArray1<'_, i64>>,
    ce_weight: Option<PyReadonlyArray1<'_, f32>>,
    ce_loss: Option<PyReadwriteArray1<'_, f32>>,
    grad_student: Option<&Bound<'_, PyAny>>,
    grad_teacher: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let div = divergence(divergence_name, beta)?;
    let s = Input::extract("student", student, student_dtype)?;
    let t = Input::extract("teacher", teacher, teacher_dtype)?;
    arrays::same_shape(("student", s.shape()), ("teacher", t.shape()))?;
    let (rows, cols) = s.shape();
    let mut gs = grad_student
        .map(|g| Output::extract("grad_student", g, student_dtype))
        .transpose()?;
    let mut gt = grad_teacher
        .map(|g| Output::extract("grad_teacher", g, teacher_dtype))
        .transpose()?;
    for g in [gs.as_ref(), gt.as_ref()].into_iter().flatten() {
        arrays::same_shape(("student", s.shape()), (g.name(), g.shape()))?;
    }
    let weight = Weights::extract("weight", weight)?;
    let mut regions = vec![
        ("student", s.bytes(), false),
        ("teacher", t.bytes(), false),
        ("weight", weight.bytes(), false),
    ];
    for g in [gs.as_ref(), gt.as_ref()].into_iter().flatten() {
        regions.push((g.name(), g.bytes(), true));
    }
    // (numpy arrays among themselves are borrow-checked by numpy's crate;
    // this catches a capsule overlapping any argument)
    regions.push(("loss", bytes_of(loss.as_slice()), true));
    for (name, r) in [
        ("labels", labels.as_ref().map(|a| bytes_of(a.as_slice()))),
        (
            "ce_weight",
            ce_weight.as_ref().map(|a| bytes_of(a.as_slice())),
        ),
    ] {
        if let Some(r) = r {
            regions.push((name, r, false));
        }
    }
    if let Some(o) = ce_loss.as_ref() {
        regions.push(("ce_loss", bytes_of(o.as_slice()), true));
    }
    disjoint(&regions)?;
    let weight = weight.slice("weight")?;
    let loss = arrays::contiguous("loss", loss.as_slice_mut())?;
    let mut ce_loss = ce_loss;
    let hard = match (labels.as_ref(), ce_weight.as_ref(), ce_loss.as_mut()) {
        (Some(l), Some(w), Some(o)) => Some(HardLabels {
            labels: arrays::contiguous("labels", l.as_slice())?,
            weight: arrays::contiguous("ce_weight", w.as_slice())?,
            loss: arrays::contiguous("ce_loss", o.as_slice_mut())?,
        }),
        (None, None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "labels, ce_weight and ce_loss go together: give all three or none",
            ))
        }
    };
    let (ss, ts) = (s.slice()?, t.slice()?);
    let gss = gs.as_mut().map(|g| g.slice()).transpose()?;
    let gts = gt.as_mut().map(|g| g.slice()).transpose()?;
    with_input!(ss, |sv| with_input!(ts, |tv| {
        let grads = Grads {
            student: gss.map(|g| typed_like(sv, g)).transpose()?,
            teacher: gts.map(|g| typed_like(tv, g)).transpose()?,
        };
        run_kernel(|| {
            kernels::distill(
                sv,
                tv,
                rows,
                cols,
                div,
                temperature,
                weight,
                loss,
                hard,
                grads,
            )
        })
    }))
}

/// Per-row weighted KL from a sparse top-k teacher (ids and log-probs) to
/// the student's full softmax, and its gradient into `grad` when given.
#[pyfunction]
#[pyo3(signature = (
    student, student_dtype, teacher_ids, teacher_logprobs, teacher_temperature, temperature,
    tail, weight, loss, grad=None,
))]
#[allow(clippy::too_many_arguments)]
fn sparse_kl(
    student: &Bound<'_, PyAny>,
    student_dtype: &str,
    teacher_ids: PyReadonlyArray2<'_, i64>,
    teacher_logprobs: PyReadonlyArray2<'_, f32>,
    teacher_temperature: f32,
    temperature: f32,
    tail: &str,
    weight: PyReadonlyArray1<'_, f32>,
    mut loss: PyReadwriteArray1<'_, f32>,
    grad: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let tail = match tail {
        "bucket" => Tail::Bucket,
        "renormalize" => Tail::Renormalize,
        "zero" => Tail::Zero,
        other => {
            return Err(PyValueError::new_err(format!(
                "tail must be bucket, renormalize or zero, got {other}"
            )))
        }
    };
    let s = Input::extract("student", student, student_dtype)?;
    let (rows, cols) = s.shape();
    let ids_shape = (teacher_ids.shape()[0], teacher_ids.shape()[1]);
    let lp_shape = (teacher_logprobs.shape()[0], teacher_logprobs.shape()[1]);
    arrays::same_shape(("teacher_ids", ids_shape), ("teacher_logprobs", lp_shape))?;
    if ids_shape.0 != rows {
        return Err(PyValueError::new_err(format!(
            "teacher_ids has {} rows but student has {rows}",
            ids_shape.0
        )));
    }
    let mut g = grad
        .map(|g| Output::extract("grad", g, student_dtype))
        .transpose()?;
    if let Some(g) = g.as_ref() {
        arrays::same_shape(("student", s.shape()), ("grad", g.shape()))?;
        disjoint(&[
            ("student", s.bytes(), false),
            ("teacher_ids", bytes_of(teacher_ids.as_slice()), false),
            (
                "teacher_logprobs",
                bytes_of(teacher_logprobs.as_slice()),
                false,
            ),
            ("weight", bytes_of(weight.as_slice()), false),
            ("loss", bytes_of(loss.as_slice()), true),
            ("grad", g.bytes(), true),
        ])?;
    }
    let teacher = SparseTeacher {
        ids: arrays::contiguous("teacher_ids", teacher_ids.as_slice())?,
        logprobs: arrays::contiguous("teacher_logprobs", teacher_logprobs.as_slice())?,
        k: ids_shape.1,
        temperature: teacher_temperature,
    };
    let weight = arrays::contiguous("weight", weight.as_slice())?;
    let loss = arrays::contiguous("loss", loss.as_slice_mut())?;
    let ss = s.slice()?;
    let gs = g.as_mut().map(|g| g.slice()).transpose()?;
    with_input!(ss, |sv| {
        let gv = gs.map(|g| typed_like(sv, g)).transpose()?;
        run_kernel(|| {
            kernels::sparse_kl(sv, rows, cols, teacher, temperature, tail, weight, loss, gv)
        })
    })
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
    m.add_function(wrap_pyfunction!(distill, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_kl, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    Ok(())
}
