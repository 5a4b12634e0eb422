//! Kernel arguments viewed as typed slices.
//!
//! Python passes tensors as DLPack capsules (see [`crate::dlpack`]) or as
//! numpy arrays: float32 tensors as float32 arrays and bfloat16/float16 ones
//! as int16 views. Either way the real dtype's name comes with them; this
//! module checks the pair and reinterprets 16-bit buffers as `half::bf16` /
//! `half::f16`.

use half::{bf16, f16};
use numpy::{
    PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::dlpack::{DlArray, Elem};

/// The dtypes the kernels accept, by the names torch gives them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

fn parse_dtype(name: &str, dtype: &str) -> PyResult<Dtype> {
    match dtype {
        "float32" => Ok(Dtype::F32),
        "bfloat16" => Ok(Dtype::Bf16),
        "float16" => Ok(Dtype::F16),
        other => Err(PyTypeError::new_err(format!(
            "{name}: dtype must be float32, bfloat16 or float16, got {other}"
        ))),
    }
}

fn elem(dtype: Dtype) -> Elem {
    match dtype {
        Dtype::F32 => Elem::F32,
        Dtype::Bf16 => Elem::Bf16,
        Dtype::F16 => Elem::F16,
    }
}

/// The bytes of a numpy array's buffer.
fn np_bytes<T, D>(a: &numpy::PyReadonlyArray<'_, T, D>) -> std::ops::Range<usize>
where
    T: numpy::Element,
    D: numpy::ndarray::Dimension,
{
    let start = a.data() as usize;
    start..start + a.len() * std::mem::size_of::<T>()
}

/// A read-only 2-D input.
pub enum Input<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    Half(PyReadonlyArray2<'py, i16>, Dtype),
    Dl(DlArray<'py>, Dtype),
}

/// A writable 2-D output.
pub enum Output<'py> {
    F32(PyReadwriteArray2<'py, f32>, &'static str),
    Half(PyReadwriteArray2<'py, i16>, Dtype, &'static str),
    Dl(DlArray<'py>, Dtype, &'static str),
}

/// A typed view of an input buffer.
pub enum InSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// A typed view of an output buffer.
pub enum OutSlice<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

fn wrong_array(name: &str, obj: &Bound<'_, PyAny>, want: &str) -> PyErr {
    let seen = obj
        .getattr("dtype")
        .and_then(|d| d.str().map(|s| s.to_string()))
        .unwrap_or_else(|_| obj.get_type().to_string());
    let ndim = obj
        .getattr("ndim")
        .map(|d| d.to_string())
        .unwrap_or_else(|_| "?".to_string());
    PyTypeError::new_err(format!(
        "{name}: expected a 2-D numpy array of {want}, got dtype {seen} with ndim {ndim}"
    ))
}

impl<'py> Input<'py> {
    pub fn extract(name: &'static str, obj: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Self> {
        let dtype = parse_dtype(name, dtype)?;
        if let Some(a) = DlArray::extract(name, obj, 2, elem(dtype))? {
            return Ok(Input::Dl(a, dtype));
        }
        match dtype {
            Dtype::F32 => obj
                .extract::<PyReadonlyArray2<'py, f32>>()
                .map(Input::F32)
                .map_err(|_| wrong_array(name, obj, "float32")),
            half => obj
                .extract::<PyReadonlyArray2<'py, i16>>()
                .map(|a| Input::Half(a, half))
                .map_err(|_| wrong_array(name, obj, "int16 (a 16-bit float view)")),
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        let s = match self {
            Input::F32(a) => a.shape(),
            Input::Half(a, _) => a.shape(),
            Input::Dl(a, _) => &a.shape,
        };
        (s[0], s[1])
    }

    /// The bytes the input covers (see [`crate::dlpack::disjoint`]).
    pub fn bytes(&self) -> std::ops::Range<usize> {
        match self {
            Input::F32(a) => np_bytes(a),
            Input::Half(a, _) => np_bytes(a),
            Input::Dl(a, _) => a.bytes(),
        }
    }

    pub fn slice(&self) -> PyResult<InSlice<'_>> {
        Ok(match self {
            Input::F32(a) => InSlice::F32(contiguous("input", a.as_slice())?),
            // SAFETY: `extract` checked the capsule's element type against
            // `dtype`; outputs were checked disjoint from inputs before any
            // slice is made (`dlpack::disjoint`).
            Input::Dl(a, dtype) => unsafe {
                match dtype {
                    Dtype::F32 => InSlice::F32(a.slice()),
                    Dtype::Bf16 => InSlice::Bf16(a.slice()),
                    Dtype::F16 => InSlice::F16(a.slice()),
                }
            },
            Input::Half(a, dtype) => {
                let raw = contiguous("input", a.as_slice())?;
                // SAFETY: half::bf16 and half::f16 are #[repr(transparent)]
                // wrappers of u16: same size and alignment as i16, and every
                // bit pattern is a valid value. The borrow keeps `raw`'s
                // lifetime, so the view cannot outlive the numpy buffer.
                unsafe {
                    match dtype {
                        Dtype::Bf16 => InSlice::Bf16(std::slice::from_raw_parts(
                            raw.as_ptr().cast(),
                            raw.len(),
                        )),
                        _ => {
                            InSlice::F16(std::slice::from_raw_parts(raw.as_ptr().cast(), raw.len()))
                        }
                    }
                }
            }
        })
    }
}

impl<'py> Output<'py> {
    pub fn extract(name: &'static str, obj: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Self> {
        let dtype = parse_dtype(name, dtype)?;
        if let Some(a) = DlArray::extract(name, obj, 2, elem(dtype))? {
            return Ok(Output::Dl(a, dtype, name));
        }
        match dtype {
            Dtype::F32 => obj
                .extract::<PyReadwriteArray2<'py, f32>>()
                .map(|a| Output::F32(a, name))
                .map_err(|_| wrong_array(name, obj, "float32 (writable)")),
            half => obj
                .extract::<PyReadwriteArray2<'py, i16>>()
                .map(|a| Output::Half(a, half, name))
                .map_err(|_| wrong_array(name, obj, "int16 (writable 16-bit float view)")),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Output::F32(_, n) | Output::Half(_, _, n) | Output::Dl(_, _, n) => n,
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        let s = match self {
            Output::F32(a, _) => a.shape(),
            Output::Half(a, _, _) => a.shape(),
            Output::Dl(a, _, _) => &a.shape,
        };
        (s[0], s[1])
    }

    /// The bytes the output covers (see [`crate::dlpack::disjoint`]).
    pub fn bytes(&self) -> std::ops::Range<usize> {
        match self {
            Output::F32(a, _) => np_bytes_mut(a),
            Output::Half(a, _, _) => np_bytes_mut(a),
            Output::Dl(a, _, _) => a.bytes(),
        }
    }

    pub fn slice(&mut self) -> PyResult<OutSlice<'_>> {
        Ok(match self {
            Output::F32(a, name) => OutSlice::F32(contiguous(name, a.as_slice_mut())?),
            // SAFETY: as in `Input::slice`; `&mut self` makes this the only
            // view of the output, whose memory `dlpack::disjoint` checked
            // apart from every other argument's.
            Output::Dl(a, dtype, _) => unsafe {
                match dtype {
                    Dtype::F32 => OutSlice::F32(a.slice_mut()),
                    Dtype::Bf16 => OutSlice::Bf16(a.slice_mut()),
                    Dtype::F16 => OutSlice::F16(a.slice_mut()),
                }
            },
            Output::Half(a, dtype, name) => {
                let raw = contiguous(name, a.as_slice_mut())?;
                let (ptr, len) = (raw.as_mut_ptr(), raw.len());
                // SAFETY: as in `Input::slice`; `raw` is a unique borrow that
                // this view replaces for the same lifetime.
                unsafe {
                    match dtype {
                        Dtype::Bf16 => {
                            OutSlice::Bf16(std::slice::from_raw_parts_mut(ptr.cast(), len))
                        }
                        _ => OutSlice::F16(std::slice::from_raw_parts_mut(ptr.cast(), len)),
                    }
                }
            }
        })
    }
}

fn np_bytes_mut<T, D>(a: &numpy::PyReadwriteArray<'_, T, D>) -> std::ops::Range<usize>
where
    T: numpy::Element,
    D: numpy::ndarray::Dimension,
{
    let start = a.data() as usize;
    start..start + a.len() * std::mem::size_of::<T>()
}

/// A read-only f32 vector (per-row weights): a DLPack capsule or a numpy array.
pub enum Weights<'py> {
    Np(PyReadonlyArray1<'py, f32>),
    Dl(DlArray<'py>),
}

impl<'py> Weights<'py> {
    pub fn extract(name: &'static str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Some(a) = DlArray::extract(name, obj, 1, Elem::F32)? {
            return Ok(Weights::Dl(a));
        }
        obj.extract::<PyReadonlyArray1<'py, f32>>()
            .map(Weights::Np)
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "{name}: expected a 1-D float32 numpy array or DLPack capsule"
                ))
            })
    }

    pub fn bytes(&self) -> std::ops::Range<usize> {
        match self {
            Weights::Np(a) => np_bytes(a),
            Weights::Dl(a) => a.bytes(),
        }
    }

    pub fn slice(&self, name: &str) -> PyResult<&[f32]> {
        match self {
            Weights::Np(a) => contiguous(name, a.as_slice()),
            // SAFETY: `extract` checked f32 elements; no output overlaps it
            // (`dlpack::disjoint`, checked before slices are made).
            Weights::Dl(a) => Ok(unsafe { a.slice() }),
        }
    }
}

pub fn contiguous<T, E>(name: &str, slice: Result<T, E>) -> PyResult<T> {
    slice.map_err(|_| PyValueError::new_err(format!("{name}: array must be C-contiguous")))
}

pub fn same_shape(a: (&str, (usize, usize)), b: (&str, (usize, usize))) -> PyResult<()> {
    if a.1 == b.1 {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "{} and {} must have the same shape, got {:?} and {:?}",
            a.0, b.0, a.1, b.1
        )))
    }
}

/// Element types that can be taken back out of a typed view.
pub trait Typed: Sized {
    fn input(s: InSlice<'_>) -> Option<&[Self]>;
    fn output(s: OutSlice<'_>) -> Option<&mut [Self]>;
}

macro_rules! impl_typed {
    ($t:ty, $variant:ident) => {
        impl Typed for $t {
            fn input(s: InSlice<'_>) -> Option<&[Self]> {
                match s {
                    InSlice::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn output(s: OutSlice<'_>) -> Option<&mut [Self]> {
                match s {
                    OutSlice::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
impl_typed!(f32, F32);
impl_typed!(bf16, Bf16);
impl_typed!(f16, F16);

/// `out` as a slice of the same element type as `like`.
pub fn typed_like<'a, E: Typed>(_like: &[E], out: OutSlice<'a>) -> PyResult<&'a mut [E]> {
    E::output(out).ok_or_else(|| PyTypeError::new_err("output dtype must match its input's dtype"))
}

/// `other` as a slice of the same element type as `like`.
pub fn typed_input_like<'a, E: Typed>(_like: &[E], other: InSlice<'a>) -> PyResult<&'a [E]> {
    E::input(other).ok_or_else(|| PyTypeError::new_err("inputs must have the same dtype"))
}

/// Runs `$body` with `$v` bound to the typed slice inside an [`InSlice`].
macro_rules! with_input {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            $crate::arrays::InSlice::F32($v) => $body,
            $crate::arrays::InSlice::Bf16($v) => $body,
            $crate::arrays::InSlice::F16($v) => $body,
        }
    };
}
pub(crate) use with_input;
