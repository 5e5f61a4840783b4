//! The libtorch features tch does not wrap, through the crate's C++ shim
//! (`csrc/torch_ext.cpp`, compiled by `build.rs` against the same libtorch headers):
//! gradient-ready hooks ([`grad_hook`]) and uploads on a copy stream ([`upload`]).

use std::ffi::{c_char, c_int, CStr};

pub mod grad_hook;
pub mod upload;

/// Room for the shim's error text (a libtorch exception message).
const ERROR_BYTES: usize = 2048;

/// Runs one shim call with an error buffer; a non-zero return becomes the shim's message.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> anyhow::Result<()> {
    let mut buf = vec![0 as c_char; ERROR_BYTES];
    if f(buf.as_mut_ptr(), buf.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated string of at most ERROR_BYTES - 1 bytes.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    anyhow::bail!("{what}: {text}")
}
