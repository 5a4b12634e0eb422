//! Pure-Rust kernels behind kdcore: temperature softmax and fused
//! distillation losses over rows of logits.
//!
//! Nothing here knows about Python. Every kernel takes row-major slices and a
//! shape, computes in `f32` whatever the storage type ([`Element`]), and runs
//! rows in parallel on a thread pool that kdcore owns ([`pool`]). SIMD is
//! chosen at run time ([`simd::SimdLevel`]); shipped builds never assume the
//! build machine's CPU.

pub mod distill;
pub mod element;
pub mod error;
pub mod kl;
pub mod pool;
mod rows;
pub mod simd;
pub mod softmax;
pub mod sparse;

pub use distill::{distill, Divergence, Grads, HardLabels};
pub use element::Element;
pub use error::KernelError;
pub use kl::{kl_div, KlGrads};
pub use simd::SimdLevel;
pub use softmax::{softmax, softmax_backward, SoftmaxKind};
pub use sparse::{sparse_kl, SparseTeacher, Tail};

// The kernels at a given SIMD level: the tests run every level a CPU has.
#[doc(hidden)]
pub use distill::distill_at;
#[doc(hidden)]
pub use softmax::{softmax_at, softmax_backward_at};
#[doc(hidden)]
pub use sparse::sparse_kl_at;
