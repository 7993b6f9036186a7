//! Reading ggml tensors as f32, whatever their storage type (public ggml API only).

use std::ffi::{c_void, CStr};

use super::sys;

/// SAFETY (caller): `t` points to a live ggml tensor.
pub(super) unsafe fn tensor_name<'a>(t: *const sys::ggml_tensor) -> &'a str {
    // SAFETY: `t` is live (caller); ggml keeps `name` a NUL-terminated fixed array.
    let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) };
    name.to_str().unwrap_or("")
}

/// Reads a whole tensor as f32 into `floats`, converting from its storage type.
///
/// SAFETY (caller): `t` is a live, computed tensor with a backend buffer.
pub(super) unsafe fn read_tensor_f32(
    t: *const sys::ggml_tensor,
    scratch: &mut Vec<u8>,
    floats: &mut Vec<f32>,
) -> bool {
    // SAFETY: `t` is live and computed with a backend buffer (caller). The read covers exactly
    // `ggml_nbytes(t)` bytes of a contiguous tensor into a buffer resized to that length;
    // `convert_to_f32` checks `scratch` holds `floats.len()` values of the type before reading.
    unsafe {
        if !sys::ggml_is_contiguous(t) {
            return false;
        }
        let n_elems: i64 = (*t).ne.iter().product();
        let bytes = sys::ggml_nbytes(t);
        scratch.resize(bytes, 0);
        sys::ggml_backend_tensor_get(t, scratch.as_mut_ptr() as *mut c_void, 0, bytes);
        floats.resize(n_elems.max(0) as usize, 0.0);
        convert_to_f32((*t).type_, scratch, floats)
    }
}

/// Converts `n = out.len()` values of ggml type `ty` stored in `raw` to f32.
pub(super) fn convert_to_f32(ty: sys::ggml_type, raw: &[u8], out: &mut [f32]) -> bool {
    if ty == sys::GGML_TYPE_F32 {
        if raw.len() < out.len() * 4 {
            return false;
        }
        for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
            *o = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        return true;
    }
    // SAFETY: ggml_get_type_traits returns a static table entry for every valid type.
    let traits = unsafe { sys::ggml_get_type_traits(ty) };
    if traits.is_null() {
        return false;
    }
    // SAFETY: non-null pointer to a static table.
    let (to_float, blck, type_size) =
        unsafe { ((*traits).to_float, (*traits).blck_size, (*traits).type_size) };
    let Some(to_float) = to_float else {
        return false;
    };
    let n = out.len() as i64;
    if blck <= 0 || n % blck != 0 || raw.len() < (n / blck) as usize * type_size {
        return false;
    }
    // SAFETY: `raw` holds n/blck blocks of `type_size` bytes (checked above) and `out` has room
    // for `n` floats; to_float reads and writes exactly that.
    unsafe { to_float(raw.as_ptr() as *const c_void, out.as_mut_ptr(), n) };
    true
}
