//! llama.cpp's built-in chat template support (public API only).

use std::ffi::{c_char, CStr, CString};

use super::{native, shim, sys};
use crate::error::{Error, Result};

/// The names of llama.cpp's built-in chat templates (`chatml`, `llama3`, ...).
pub fn builtin_chat_templates() -> Vec<String> {
    // SAFETY: with a null output and length 0 llama.cpp only returns the count.
    let n = unsafe { sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0) };
    let mut names: Vec<*const c_char> = vec![std::ptr::null(); n.max(0) as usize];
    // SAFETY: `names` has room for `names.len()` pointers; llama.cpp fills them with static
    // NUL-terminated strings.
    let n = unsafe { sys::llama_chat_builtin_templates(names.as_mut_ptr(), names.len()) };
    names
        .iter()
        .take(n.max(0) as usize)
        .filter(|p| !p.is_null())
        // SAFETY: non-null pointers to llama.cpp's static NUL-terminated names.
        .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect()
}

/// Formats a conversation with llama.cpp's built-in template support.
///
/// `template` is the Jinja source (from the GGUF) or a built-in name such as `chatml`.
/// llama.cpp recognises templates by their shape; an unknown one is an error, not a guess.
pub fn apply_chat_template(
    template: &str,
    messages: &[(String, String)],
    add_assistant: bool,
) -> Result<String> {
    let tmpl = CString::new(template)
        .map_err(|_| Error::Template("template contains a NUL byte".into()))?;
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|(r, c)| Ok((CString::new(r.as_str())?, CString::new(c.as_str())?)))
        .collect::<std::result::Result<_, std::ffi::NulError>>()
        .map_err(|_| Error::Template("a message contains a NUL byte".into()))?;
    let msgs: Vec<sys::llama_chat_message> = owned
        .iter()
        .map(|(r, c)| sys::llama_chat_message {
            role: r.as_ptr(),
            content: c.as_ptr(),
        })
        .collect();
    let total: usize = messages.iter().map(|(r, c)| r.len() + c.len()).sum();
    let mut buf = vec![0u8; 2 * total + 256];
    loop {
        let mut n = 0;
        // SAFETY: `msgs` points into `owned`, alive for the call; `buf` is writable for its
        // length; `n` is a valid result place.
        native("llama_chat_apply_template", unsafe {
            shim::qf_chat_apply_template(
                tmpl.as_ptr(),
                msgs.as_ptr(),
                msgs.len(),
                add_assistant,
                buf.as_mut_ptr() as *mut c_char,
                buf.len().min(i32::MAX as usize) as i32,
                &mut n,
            )
        })?;
        if n < 0 {
            return Err(Error::Template(
                "llama.cpp does not support this chat template: pass --template chatml (or another built-in name)".into(),
            ));
        }
        let n = n as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.resize(n, 0);
    }
}
