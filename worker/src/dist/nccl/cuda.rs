//! Guards for the CUDA state an operation touches: the current device and the two events.

use std::ffi::c_int;
use std::ptr::null_mut;

use super::ffi;
use super::library::Lib;

/// Makes `device` current on this thread and restores the previous device when dropped, so the
/// caller's CUDA state is left as it was.
pub(super) struct DeviceGuard {
    lib: &'static Lib,
    previous: Option<c_int>,
    device: c_int,
}

impl DeviceGuard {
    pub(super) fn set(
        lib: &'static Lib,
        device: usize,
    ) -> std::result::Result<DeviceGuard, String> {
        let device = device as c_int;
        let mut current = 0;
        // SAFETY: plain out-parameter call.
        let previous = (unsafe { (lib.cuda_get_device)(&mut current) } == ffi::CUDA_SUCCESS)
            .then_some(current);
        if previous != Some(device) {
            lib.cuda(
                unsafe { (lib.cuda_set_device)(device) },
                &format!("cudaSetDevice({device})"),
            )?;
        }
        Ok(DeviceGuard {
            lib,
            previous,
            device,
        })
    }
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        if let Some(p) = self.previous.filter(|&p| p != self.device) {
            // SAFETY: restoring a device that was current before.
            unsafe { (self.lib.cuda_set_device)(p) };
        }
    }
}

/// The two events every operation records: before the NCCL call and after it.
pub(super) struct Events {
    lib: &'static Lib,
    device: usize,
    pub(super) start: ffi::Event,
    pub(super) done: ffi::Event,
}

impl Events {
    pub(super) fn new(lib: &'static Lib, device: usize) -> std::result::Result<Events, String> {
        let _dev = DeviceGuard::set(lib, device)?;
        let mut ev = Events {
            lib,
            device,
            start: null_mut(),
            done: null_mut(),
        };
        for slot in [&mut ev.start, &mut ev.done] {
            // SAFETY: out-parameter; timing is off because only completion is asked about.
            let code =
                unsafe { (lib.cuda_event_create_with_flags)(slot, ffi::CUDA_EVENT_DISABLE_TIMING) };
            lib.cuda(code, "cudaEventCreateWithFlags")?;
        }
        Ok(ev)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _dev = DeviceGuard::set(self.lib, self.device);
        for e in [self.start, self.done] {
            if !e.is_null() {
                // SAFETY: created by cudaEventCreateWithFlags and no longer recorded.
                unsafe { (self.lib.cuda_event_destroy)(e) };
            }
        }
    }
}
