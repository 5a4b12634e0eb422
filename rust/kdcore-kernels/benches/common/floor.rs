//! The memory floor of a fused forward + backward, shared by the criterion
//! bench and the `floor_ratio` example.

use kdcore_kernels::Element;

/// out = s + t over scoped threads, one contiguous share each: the least
/// traffic of a forward + backward (read both logits, write one gradient).
pub fn floor<E: Element>(s: &[E], t: &[E], out: &mut [E], threads: usize) {
    let len = s.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for ((sc, tc), oc) in s.chunks(len).zip(t.chunks(len)).zip(out.chunks_mut(len)) {
            scope.spawn(move || {
                for ((o, a), b) in oc.iter_mut().zip(sc).zip(tc) {
                    *o = E::from_f32(a.to_f32() + b.to_f32());
                }
            });
        }
    });
}
