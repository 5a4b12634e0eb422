//! Fused KL divergence between temperature softmaxes, loss and gradients in
//! one call.
//!
//! For each row r, with P = softmax(p_logits / T) and Q = softmax(q_logits / T):
//!
//!   loss_r = w_r · KL(P ‖ Q) = w_r · Σ_j P_j (log P_j − log Q_j)
//!   ∂loss_r/∂q_logits_j = w_r · (Q_j − P_j) / T
//!   ∂loss_r/∂p_logits_j = w_r · P_j · (log P_j − log Q_j − KL) / T
//!
//! Forward distillation KL(P_teacher ‖ P_student) passes the teacher as `p`;
//! reverse KL passes the student as `p`. Terms with P_j = 0 contribute 0
//! (0 · log 0 = 0), so `-inf` logits (banned tokens) are exact.
//!
//! Passes per row: maxima of both rows; partition functions and the KL sum on
//! logits shifted by their maxima (no cancellation between large logits);
//! then, only when a gradient is asked for, the gradient pass.

use crate::distill::{distill, Divergence, Grads};
use crate::element::Element;
use crate::error::KernelError;

/// Where to write the gradients; `None` skips that gradient's work.
pub struct KlGrads<'a, P, Q> {
    /// ∂(Σ_r loss_r)/∂p_logits, `rows x cols`.
    pub p: Option<&'a mut [P]>,
    /// ∂(Σ_r loss_r)/∂q_logits, `rows x cols`.
    pub q: Option<&'a mut [Q]>,
}

/// Per-row weighted KL(softmax(p/T) ‖ softmax(q/T)) and, on request, the
/// gradients of Σ_r loss_r. Rows with weight 0 give loss 0 and gradient 0.
///
/// The forward distillation KL of [`distill`] with Q as the student.
#[allow(clippy::too_many_arguments)]
pub fn kl_div<P: Element, Q: Element>(
    p_logits: &[P],
    q_logits: &[Q],
    rows: usize,
    cols: usize,
    temperature: f32,
    row_weight: &[f32],
    row_loss: &mut [f32],
    grads: KlGrads<'_, P, Q>,
) -> Result<(), KernelError> {
    let grads = Grads {
        student: grads.q,
        teacher: grads.p,
    };
    distill(
        q_logits,
        p_logits,
        rows,
        cols,
        Divergence::Kl,
        temperature,
        row_weight,
        row_loss,
        None,
        grads,
    )
    .map_err(|e| match e {
        KernelError::Length {
            what: "student",
            expected,
            got,
        } => KernelError::Length {
            what: "q_logits",
            expected,
            got,
        },
        KernelError::Length {
            what: "teacher",
            expected,
            got,
        } => KernelError::Length {
            what: "p_logits",
            expected,
            got,
        },
        KernelError::Length {
            what: "grad_student",
            expected,
            got,
        } => KernelError::Length {
            what: "grad_q",
            expected,
            got,
        },
        KernelError::Length {
            what: "grad_teacher",
            expected,
            got,
        } => KernelError::Length {
            what: "grad_p",
            expected,
            got,
        },
        other => other,
    })
}
