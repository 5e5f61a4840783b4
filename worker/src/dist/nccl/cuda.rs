//! Guards for the CUDA state an operation touches: the current device, and the communicator's
//! stream with the events that order and time its operations.

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

/// The communicator's own non-blocking stream, and the events every operation records:
/// `ready` on the legacy default stream (where tch's kernels run) for the NCCL stream to wait
/// on, then `start` and `done` on the NCCL stream around the NCCL call.
pub(super) struct Events {
    lib: &'static Lib,
    device: usize,
    pub(super) stream: ffi::Stream,
    pub(super) ready: ffi::Event,
    pub(super) start: ffi::Event,
    pub(super) done: ffi::Event,
}

impl Events {
    pub(super) fn new(lib: &'static Lib, device: usize) -> std::result::Result<Events, String> {
        let _dev = DeviceGuard::set(lib, device)?;
        let mut ev = Events {
            lib,
            device,
            stream: null_mut(),
            ready: null_mut(),
            start: null_mut(),
            done: null_mut(),
        };
        // SAFETY: out-parameter; a non-blocking stream does not wait for the legacy stream's
        // kernels implicitly, so NCCL runs beside backward's kernels, ordered by `ready`.
        let code = unsafe {
            (lib.cuda_stream_create_with_flags)(&mut ev.stream, ffi::CUDA_STREAM_NON_BLOCKING)
        };
        lib.cuda(code, "cudaStreamCreateWithFlags")?;
        for slot in [&mut ev.ready, &mut ev.start, &mut ev.done] {
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
        for e in [self.ready, self.start, self.done] {
            if !e.is_null() {
                // SAFETY: created by cudaEventCreateWithFlags and no longer recorded.
                unsafe { (self.lib.cuda_event_destroy)(e) };
            }
        }
        if !self.stream.is_null() {
            // SAFETY: created above; CUDA releases it once work still queued on it is done.
            unsafe { (self.lib.cuda_stream_destroy)(self.stream) };
        }
    }
}
