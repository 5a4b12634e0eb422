//! The one error type of the kernel crate: bad shapes or parameters.

use std::fmt;

/// Why a kernel refused its arguments. Kernels never panic on bad input.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelError {
    /// A buffer's length does not match the shape it was given with.
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A scalar parameter is out of its domain.
    Parameter { what: &'static str, message: String },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Length {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected {expected} elements, got {got}"),
            KernelError::Parameter { what, message } => write!(f, "{what}: {message}"),
        }
    }
}

impl std::error::Error for KernelError {}

pub(crate) fn check_len(
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), KernelError> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::Length {
            what,
            expected,
            got,
        })
    }
}

/// Temperatures must be finite and positive; returns 1/T.
pub(crate) fn inverse_temperature(temperature: f32) -> Result<f32, KernelError> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(1.0 / temperature)
    } else {
        Err(KernelError::Parameter {
            what: "temperature",
            message: format!("must be finite and > 0, got {temperature}"),
        })
    }
}
