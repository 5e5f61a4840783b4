//! Running one NCCL operation and waiting for it: the calling thread polls the completion
//! event, NCCL's asynchronous error and abort requests, and aborts on an error or a timeout.

use std::ffi::c_int;
use std::ptr::null_mut;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::cuda::DeviceGuard;
use super::library::Lib;
use super::{ffi, Failure, NcclCollective, State};
use crate::dist::Result;

impl NcclCollective {
    /// An abort request or an asynchronous NCCL error, if either is pending.
    pub(super) fn pending_failure(&self, st: &State, what: &str) -> Option<Failure> {
        if let Some(f) = self.abort_failure() {
            return Some(f);
        }
        match self.lib.async_state(st.comm) {
            Ok(ffi::SUCCESS | ffi::IN_PROGRESS) => None,
            Ok(code) => Some(Failure::Nccl(format!(
                "{what}: NCCL reported {}",
                self.lib.describe(code, st.comm)
            ))),
            Err(reason) => Some(Failure::Nccl(reason)),
        }
    }

    /// An NCCL call's error as a failure: argument errors are this rank's bug, the rest are
    /// reported as peer or transport failures.
    pub(super) fn call_failure(&self, what: &str, code: c_int, comm: ffi::Comm) -> Failure {
        let text = format!("{what}: {}", self.lib.describe(code, comm));
        if code == ffi::INVALID_ARGUMENT || code == ffi::INVALID_USAGE {
            Failure::Usage(text)
        } else {
            Failure::Nccl(text)
        }
    }

    /// Runs one NCCL operation (`issue` makes the NCCL calls on the stream it is given, the
    /// communicator's own) after the work queued so far on the legacy default stream, and
    /// waits until the GPU has finished it. Any failure aborts and poisons.
    pub(super) fn run(
        &self,
        st: &mut State,
        what: &str,
        issue: impl FnOnce(&Lib, ffi::Comm, ffi::Stream) -> c_int,
    ) -> Result<()> {
        let lib = self.lib;
        let _dev = match DeviceGuard::set(lib, self.device) {
            Ok(d) => d,
            Err(e) => return Err(self.fail(st, Failure::Nccl(format!("{what}: {e}")))),
        };
        let stream = st.events.stream;
        // SAFETY: events and stream created on this device; the null stream is the legacy
        // default stream, where tch queued the kernels that produce this operation's input.
        let ordered = unsafe {
            let code = (lib.cuda_event_record)(st.events.ready, null_mut());
            lib.cuda(code, "cudaEventRecord")
                .and_then(|()| {
                    let code = (lib.cuda_stream_wait_event)(stream, st.events.ready, 0);
                    lib.cuda(code, "cudaStreamWaitEvent")
                })
                .and_then(|()| {
                    let code = (lib.cuda_event_record)(st.events.start, stream);
                    lib.cuda(code, "cudaEventRecord")
                })
        };
        if let Err(e) = ordered {
            return Err(self.fail(st, Failure::Nccl(format!("{what}: {e}"))));
        }
        match issue(lib, st.comm, stream) {
            ffi::SUCCESS => {}
            ffi::IN_PROGRESS => self.wait_enqueued(st, what)?,
            code => {
                let f = self.call_failure(what, code, st.comm);
                return Err(self.fail(st, f));
            }
        }
        // SAFETY: as above; recorded after NCCL's kernels on their stream, so it completes
        // after them. The caller reads the result only after this completes.
        let code = unsafe { (lib.cuda_event_record)(st.events.done, stream) };
        if let Err(e) = lib.cuda(code, "cudaEventRecord") {
            return Err(self.fail(st, Failure::Nccl(format!("{what}: {e}"))));
        }
        self.wait_done(st, what)
    }

    /// A non-blocking communicator returns `ncclInProgress` while it connects or enqueues;
    /// its kernels are on the stream once the state turns to success.
    pub(super) fn wait_enqueued(&self, st: &mut State, what: &str) -> Result<()> {
        let t0 = Instant::now();
        let mut pause = Backoff::new();
        loop {
            if let Some(f) = self.abort_failure() {
                return Err(self.fail(st, f));
            }
            match self.lib.async_state(st.comm) {
                Ok(ffi::SUCCESS) => return Ok(()),
                Ok(ffi::IN_PROGRESS) => {}
                Ok(code) => {
                    let f = self.call_failure(what, code, st.comm);
                    return Err(self.fail(st, f));
                }
                Err(reason) => return Err(self.fail(st, Failure::Nccl(reason))),
            }
            if t0.elapsed() > self.timeout {
                tracing::warn!(
                    rank = self.rank,
                    what,
                    "NCCL did not finish enqueueing in time"
                );
                return Err(self.fail(st, self.timeout_failure()));
            }
            pause.pause();
        }
    }

    /// Polls the completion event, NCCL's asynchronous error and abort requests until the
    /// operation is done or the timeout passes.
    pub(super) fn wait_done(&self, st: &mut State, what: &str) -> Result<()> {
        let lib = self.lib;
        let t0 = Instant::now();
        let mut reached: Option<Instant> = None;
        let mut pause = Backoff::new();
        loop {
            // SAFETY: recorded event of this device.
            match unsafe { (lib.cuda_event_query)(st.events.done) } {
                ffi::CUDA_SUCCESS => return Ok(()),
                ffi::CUDA_ERROR_NOT_READY => {}
                code => {
                    let f = Failure::Nccl(format!(
                        "{what}: CUDA failed while the collective ran: {}",
                        lib.cuda_error(code)
                    ));
                    return Err(self.fail(st, f));
                }
            }
            if let Some(f) = self.pending_failure(st, what) {
                return Err(self.fail(st, f));
            }
            if reached.is_none()
                && unsafe { (lib.cuda_event_query)(st.events.start) } == ffi::CUDA_SUCCESS
            {
                reached = Some(Instant::now());
            }
            if reached.unwrap_or(t0).elapsed() > self.timeout {
                if reached.is_none() {
                    tracing::warn!(
                        rank = self.rank,
                        what,
                        "the GPU did not even reach the collective within the timeout"
                    );
                } else {
                    tracing::warn!(
                        rank = self.rank,
                        what,
                        "the collective did not finish in time"
                    );
                }
                return Err(self.fail(st, self.timeout_failure()));
            }
            pause.pause();
        }
    }

    pub(super) fn abort_failure(&self) -> Option<Failure> {
        self.abort_requested.load(Ordering::Acquire).then(|| {
            Failure::Aborted(
                self.abort_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            )
        })
    }

    pub(super) fn timeout_failure(&self) -> Failure {
        Failure::Timeout {
            waited_ms: self.timeout.as_millis() as u64,
        }
    }
}

/// Polling pace: yield for the first rounds (short collectives finish in microseconds), then
/// sleep with doubling pauses up to a millisecond.
pub(super) struct Backoff {
    rounds: u32,
    sleep: Duration,
}

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff {
            rounds: 0,
            sleep: Duration::from_micros(10),
        }
    }

    pub(super) fn pause(&mut self) {
        if self.rounds < 64 {
            self.rounds += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(Duration::from_millis(1));
        }
    }
}
