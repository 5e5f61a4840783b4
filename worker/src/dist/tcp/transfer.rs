//! Running a [`Plan`] over the links: one thread per lane and direction, a shared record of
//! which segments have arrived, and on failure an abort frame to every peer still waiting.

use std::io::Read;
use std::net::TcpStream;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread;

use super::plan::{reduce_into, Plan, RecvItem};
use super::tuning::segment_bytes;
use super::wire::{
    decode_abort, decode_header, encode_abort, io_failure, write_frame, FRAME_ABORT, FRAME_DATA,
    HEADER_LEN,
};
use super::{Failure, OpState, TcpCollective};
use crate::dist::Result;

impl TcpCollective {
    /// Takes the operation lock, refusing to start when poisoned, and numbers the operation.
    pub(super) fn begin(&self) -> Result<MutexGuard<'_, OpState>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &st.poisoned {
            return Err(self.to_error(f));
        }
        st.seq = st.seq.wrapping_add(1);
        Ok(st)
    }

    /// Runs a plan under the operation lock; a failure poisons the collective.
    pub(super) fn execute(&self, st: &mut OpState, mut plan: Plan) -> Result<()> {
        plan.assign_lanes(self.world, self.lanes);
        match self.run_plan(&plan, st.seq) {
            Ok(()) => Ok(()),
            Err(f) => {
                self.abort_everyone(&f, st.seq);
                let e = self.to_error(&f);
                st.poisoned = Some(f);
                Err(e)
            }
        }
    }

    /// After a failed operation, leaves an abort frame on every link but the culprit's, so a
    /// peer that reads from this rank later (in this or its next operation) learns which rank
    /// failed instead of blaming this one when this process exits. Every outgoing stream is at
    /// a frame boundary here: the sender only stops mid-frame on an error with the culprit.
    /// Non-blocking, so a peer that stopped reading cannot stall the error path.
    fn abort_everyone(&self, f: &Failure, seq: u32) {
        let culprit = f.culprit();
        let payload = encode_abort(f, self.rank);
        for (p, lanes) in self.links.iter().enumerate() {
            if Some(p) == culprit {
                continue;
            }
            for link in lanes {
                if link.set_nonblocking(true).is_ok() {
                    let _ = write_frame(link, FRAME_ABORT, seq, &payload);
                }
            }
        }
    }

    fn link(&self, peer: usize, lane: usize) -> &TcpStream {
        &self.links[peer][lane]
    }

    /// Runs every lane's sends and receives on threads of their own (the last task on the
    /// calling thread), so all streams move data in both directions at once.
    pub(super) fn run_plan(&self, plan: &Plan, seq: u32) -> std::result::Result<(), Failure> {
        let progress = TransferProgress {
            state: Mutex::new((vec![false; plan.recvs.len()], None)),
            cv: Condvar::new(),
        };
        let mut tasks: Vec<(bool, Vec<usize>)> = Vec::new();
        for lane in 0..self.lanes {
            let sends: Vec<usize> = (0..plan.sends.len())
                .filter(|&i| plan.sends[i].lane == lane)
                .collect();
            let recvs: Vec<usize> = (0..plan.recvs.len())
                .filter(|&i| plan.recvs[i].lane == lane)
                .collect();
            if !sends.is_empty() {
                tasks.push((true, sends));
            }
            if !recvs.is_empty() {
                tasks.push((false, recvs));
            }
        }
        let progress_ref = &progress;
        let run = move |(is_send, items): (bool, Vec<usize>)| {
            if is_send {
                self.run_sends(plan, &items, progress_ref, seq)
            } else {
                self.run_recvs(plan, &items, progress_ref, seq)
            }
        };
        let last = tasks.pop();
        thread::scope(|s| {
            for task in tasks {
                s.spawn(move || run(task));
            }
            if let Some(task) = last {
                run(task);
            }
        });
        let (_, failure) = progress
            .state
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        failure.map_or(Ok(()), Err)
    }

    fn run_sends(&self, plan: &Plan, items: &[usize], progress: &TransferProgress, seq: u32) {
        for (k, &i) in items.iter().enumerate() {
            let item = &plan.sends[i];
            if let Err(f) = progress.wait_for(item.after_recv) {
                self.send_aborts(plan, &items[k..], &f, seq);
                return;
            }
            // SAFETY: the plan's builder guarantees the range lies in a live buffer that no
            // receive item writes while this send can run (see `ring_plan`).
            let payload: &[u8] = if item.len == 0 {
                &[]
            } else {
                unsafe { std::slice::from_raw_parts(item.ptr as *const u8, item.len) }
            };
            if let Err(e) = write_frame(self.link(item.peer, item.lane), FRAME_DATA, seq, payload) {
                let f = io_failure(item.peer, &e, self.timeout, "send to");
                progress.fail(f.clone());
                self.send_aborts(plan, &items[k + 1..], &f, seq);
                return;
            }
        }
    }

    /// Tells every peer this rank still owed data that the operation failed, and why.
    fn send_aborts(&self, plan: &Plan, remaining: &[usize], f: &Failure, seq: u32) {
        let culprit = f.culprit();
        let payload = encode_abort(f, self.rank);
        let mut told = vec![false; self.world];
        for item in remaining.iter().map(|&i| &plan.sends[i]) {
            if told[item.peer] || Some(item.peer) == culprit {
                continue;
            }
            told[item.peer] = true;
            // Best effort: the peer may be gone too, and its own error will say so.
            let _ = write_frame(self.link(item.peer, item.lane), FRAME_ABORT, seq, &payload);
        }
    }

    fn run_recvs(&self, plan: &Plan, items: &[usize], progress: &TransferProgress, seq: u32) {
        let needs_scratch = items.iter().any(|&i| plan.recvs[i].reduce.is_some());
        // u64 storage keeps the scratch aligned for every element type.
        let mut scratch = vec![
            0u64;
            if needs_scratch {
                segment_bytes() / 8
            } else {
                0
            }
        ];
        for &i in items {
            if progress.failed() {
                return;
            }
            if let Err(f) = self.recv_one(&plan.recvs[i], &mut scratch, seq) {
                progress.fail(f);
                return;
            }
            progress.advance(i);
        }
    }

    fn recv_one(
        &self,
        item: &RecvItem,
        scratch: &mut [u64],
        seq: u32,
    ) -> std::result::Result<(), Failure> {
        let mut stream = self.link(item.peer, item.lane);
        let mut header = [0u8; HEADER_LEN];
        stream
            .read_exact(&mut header)
            .map_err(|e| io_failure(item.peer, &e, self.timeout, "receive from"))?;
        let (tag, their_seq, len) = decode_header(&header);
        if tag == FRAME_ABORT {
            let mut payload = vec![0u8; len.min(1 << 16) as usize];
            stream
                .read_exact(&mut payload)
                .map_err(|e| io_failure(item.peer, &e, self.timeout, "receive from"))?;
            return Err(decode_abort(&payload, item.peer));
        }
        if tag != FRAME_DATA {
            return Err(Failure::Peer {
                rank: item.peer,
                reason: format!("sent a corrupt frame (tag {tag:#x}); is it a contrail peer?"),
            });
        }
        if their_seq != seq || len != item.len as u64 {
            return Err(Failure::Usage(format!(
                "rank {} sent {len} bytes for collective #{their_seq} while rank {} expected {} \
                 bytes for collective #{seq}: ranks called collectives in a different order or \
                 with different shapes/counts",
                item.peer, self.rank, item.len
            )));
        }
        match item.reduce {
            _ if item.len == 0 => {}
            None => {
                // SAFETY: the range lies in the operation's output buffer and nothing else
                // touches it until this segment is marked received.
                let dst = unsafe { std::slice::from_raw_parts_mut(item.ptr as *mut u8, item.len) };
                stream
                    .read_exact(dst)
                    .map_err(|e| io_failure(item.peer, &e, self.timeout, "receive from"))?;
            }
            Some(elem) => {
                // SAFETY: scratch holds segment_bytes() and segments are at most that long.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut u8, item.len)
                };
                stream
                    .read_exact(buf)
                    .map_err(|e| io_failure(item.peer, &e, self.timeout, "receive from"))?;
                // SAFETY: same range argument as above; both are aligned to the element size.
                unsafe { reduce_into(elem, item.ptr, buf.as_ptr(), item.len) };
            }
        }
        Ok(())
    }

    pub(super) fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.world).map(move |k| (self.rank + k) % self.world)
    }
}

/// Sender/receiver rendezvous of one operation: how many receive items are done, and the
/// first failure either side saw.
struct TransferProgress {
    /// Which receive items are done (lanes finish them out of order), and the first failure.
    state: Mutex<(Vec<bool>, Option<Failure>)>,
    cv: Condvar,
}

impl TransferProgress {
    fn lock(&self) -> MutexGuard<'_, (Vec<bool>, Option<Failure>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_for(&self, recv_index: Option<usize>) -> std::result::Result<(), Failure> {
        let mut st = self.lock();
        loop {
            if let Some(f) = &st.1 {
                return Err(f.clone());
            }
            match recv_index {
                Some(i) if !st.0[i] => {
                    st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                _ => return Ok(()),
            }
        }
    }

    fn advance(&self, i: usize) {
        self.lock().0[i] = true;
        self.cv.notify_all();
    }

    fn fail(&self, f: Failure) {
        let mut st = self.lock();
        if st.1.is_none() {
            st.1 = Some(f);
        }
        drop(st);
        self.cv.notify_all();
    }

    fn failed(&self) -> bool {
        self.lock().1.is_some()
    }
}
