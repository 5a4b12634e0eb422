//! Tensors handed over as DLPack capsules (`torch.utils.dlpack.to_dlpack`).
//!
//! A capsule costs Python a fraction of a numpy view's price per argument,
//! which is most of a small call's cost outside the kernel. The capsule owns
//! a reference to the tensor, and the argument keeps the capsule alive for
//! the whole call; the call holds the GIL, so no Python code can free or
//! move the tensor's memory meanwhile. The capsule is only read, never
//! consumed: its own destructor releases the tensor afterwards.
//!
//! Only what the kernels take is accepted: CPU memory, C-contiguous, aligned
//! for the element type, of the expected rank and element type. Outputs must
//! not overlap any other argument ([`disjoint`]).

use std::ffi::c_void;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyCapsuleMethods};

/// The C layout of `DLTensor` (DLPack 0.x and 1.x: the struct the legacy
/// `"dltensor"` capsule's `DLManagedTensor` starts with).
#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device_type: i32,
    device_id: i32,
    ndim: i32,
    code: u8,
    bits: u8,
    lanes: u16,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

const DL_CPU: i32 = 1;

/// An element type by its DLPack code and width.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Elem {
    F32,
    Bf16,
    F16,
    I64,
}

impl Elem {
    fn of(code: u8, bits: u8) -> Option<Elem> {
        match (code, bits) {
            (2, 32) => Some(Elem::F32),
            (4, 16) => Some(Elem::Bf16),
            (2, 16) => Some(Elem::F16),
            (0, 64) => Some(Elem::I64),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::Bf16 => "bfloat16",
            Elem::F16 => "float16",
            Elem::I64 => "int64",
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 | Elem::F16 => 2,
            Elem::I64 => 8,
        }
    }
}

/// A checked view of one capsule's memory: `len` elements of `elem` at
/// `data`, in `shape` (rank 1 or 2).
pub struct DlArray<'py> {
    _capsule: Bound<'py, PyCapsule>,
    data: *mut u8,
    pub shape: Vec<usize>,
    pub elem: Elem,
}

/// The legacy DLPack capsule name (not yet consumed).
const NAME: &std::ffi::CStr = c"dltensor";

impl<'py> DlArray<'py> {
    /// `obj` as a DLPack view when it is a capsule (None when it is not: the
    /// caller tries a numpy array), checked for rank `ndim` and `elem`.
    pub fn extract(
        name: &str,
        obj: &Bound<'py, PyAny>,
        ndim: usize,
        elem: Elem,
    ) -> PyResult<Option<Self>> {
        let Ok(capsule) = obj.cast::<PyCapsule>() else {
            return Ok(None);
        };
        let ptr = capsule.pointer_checked(Some(NAME)).map_err(|_| {
            PyTypeError::new_err(format!(
                "{name}: expected an unused \"dltensor\" capsule (torch.utils.dlpack.to_dlpack)"
            ))
        })?;
        // SAFETY: a capsule named "dltensor" holds a `DLManagedTensor*` (the
        // DLPack contract), whose first member is the `DLTensor` laid out as
        // `DlTensor`. The capsule (kept in the returned value) owns it, so
        // it stays valid while `self` lives; it is only read here.
        let t = unsafe { &*ptr.as_ptr().cast::<DlTensor>() };
        if t.device_type != DL_CPU {
            return Err(PyValueError::new_err(format!(
                "{name}: must be in CPU memory (DLPack device type {})",
                t.device_type
            )));
        }
        let seen = Elem::of(t.code, t.bits).filter(|_| t.lanes == 1);
        if seen != Some(elem) {
            return Err(PyTypeError::new_err(format!(
                "{name}: expected {} elements, got DLPack type code {} with {} bits x {} lanes",
                elem.name(),
                t.code,
                t.bits,
                t.lanes
            )));
        }
        if usize::try_from(t.ndim).ok() != Some(ndim) || t.shape.is_null() {
            return Err(PyValueError::new_err(format!(
                "{name}: expected a {ndim}-D tensor, got {} dimensions",
                t.ndim
            )));
        }
        // SAFETY: `shape` points to `ndim` sizes, and `strides` (when not
        // null) to `ndim` strides, owned by the tensor as above.
        let sizes = unsafe { std::slice::from_raw_parts(t.shape, ndim) };
        let strides =
            (!t.strides.is_null()).then(|| unsafe { std::slice::from_raw_parts(t.strides, ndim) });
        let shape: Vec<usize> = sizes
            .iter()
            .map(|&n| usize::try_from(n))
            .collect::<Result<_, _>>()
            .map_err(|_| PyValueError::new_err(format!("{name}: negative size {sizes:?}")))?;
        if let Some(strides) = strides {
            // C order; a stride of a dimension of size 1 never matters.
            let mut want = 1usize;
            for (&n, &s) in shape.iter().zip(strides).rev() {
                if n > 1 && usize::try_from(s).ok() != Some(want) {
                    return Err(PyValueError::new_err(format!(
                        "{name}: tensor must be C-contiguous, got strides {strides:?} for shape {shape:?}"
                    )));
                }
                want = want.saturating_mul(n);
            }
        }
        let offset = usize::try_from(t.byte_offset).unwrap_or(usize::MAX);
        let data = (t.data as *mut u8).wrapping_add(offset);
        let len = shape.iter().product::<usize>();
        if len > 0 && (data.is_null() || (data as usize) % elem.size() != 0) {
            return Err(PyValueError::new_err(format!(
                "{name}: data is not aligned for {}",
                elem.name()
            )));
        }
        Ok(Some(DlArray {
            _capsule: capsule.clone(),
            data,
            shape,
            elem,
        }))
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The byte range the view covers (empty for no elements).
    pub fn bytes(&self) -> std::ops::Range<usize> {
        let start = self.data as usize;
        start..start + self.len() * self.elem.size()
    }

    /// The elements as a slice of `E`.
    ///
    /// # Safety
    /// `E` is the Rust type of `self.elem` (f32, bf16, f16, i64), and no
    /// mutable view of overlapping memory lives as long as the slice.
    pub unsafe fn slice<E>(&self) -> &[E] {
        debug_assert_eq!(std::mem::size_of::<E>(), self.elem.size());
        if self.len() == 0 {
            return &[];
        }
        // SAFETY: checked in `extract`: non-null, aligned for `elem`, `len`
        // elements of the tensor's memory, kept alive by the capsule; the
        // caller guarantees the type and the absence of aliasing writes.
        unsafe { std::slice::from_raw_parts(self.data.cast::<E>(), self.len()) }
    }

    /// The elements as a mutable slice of `E`.
    ///
    /// # Safety
    /// As [`DlArray::slice`], and no other view of overlapping memory lives
    /// as long as the slice (see [`disjoint`]).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<E>(&self) -> &mut [E] {
        debug_assert_eq!(std::mem::size_of::<E>(), self.elem.size());
        if self.len() == 0 {
            return &mut [];
        }
        // SAFETY: as in `slice`; uniqueness is the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.data.cast::<E>(), self.len()) }
    }
}

/// The memory of one argument: its name, its bytes, and whether the kernel writes it.
pub type Region<'a> = (&'a str, std::ops::Range<usize>, bool);

/// An error unless every written region is disjoint from every other region
/// (the kernels take outputs as `&mut` slices, which must not alias).
pub fn disjoint(regions: &[Region<'_>]) -> PyResult<()> {
    for (i, (a, ra, wa)) in regions.iter().enumerate() {
        for (b, rb, wb) in &regions[i + 1..] {
            let overlap = ra.start < rb.end && rb.start < ra.end;
            if (*wa || *wb) && overlap {
                return Err(PyValueError::new_err(format!(
                    "{a} and {b} share memory; an output must not overlap another argument"
                )));
            }
        }
    }
    Ok(())
}
