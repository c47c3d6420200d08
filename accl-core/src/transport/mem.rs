//! The in-process provider: ranks are threads of one process and lanes are shared queues.
//!
//! A send posts a descriptor of the sender's buffer; the receiver copies straight from it into
//! its own buffer (one copy, as a zero-copy network would do) and completes both sides. Each
//! rank has one [`Doorbell`] that every event aimed at it rings, so a waiting rank sleeps on a
//! condition variable instead of spinning. It exists to run the whole collective suite as
//! threads, and behaves like a network transport: FIFO lanes, header checks, peers that vanish.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::{
    Connecting, Doorbell, Header, LaneEnds, LaneError, LaneSetup, Listener, MemoryRegion, Provider, RecvLane, SendLane,
    WaitSource,
};
use crate::error::{Error, Result};

/// Listeners of this process, by handle.
fn registry() -> &'static Mutex<HashMap<u64, Arc<ListenerShared>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u64, Arc<ListenerShared>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

static NEXT_LISTENER: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The in-process provider of one rank.
pub struct MemProvider {
    bell: Arc<Doorbell>,
}

impl MemProvider {
    /// A provider with a fresh doorbell for its rank.
    pub fn new() -> MemProvider {
        MemProvider { bell: Doorbell::new() }
    }
}

impl Default for MemProvider {
    fn default() -> Self {
        MemProvider::new()
    }
}

/// A lane waiting to be accepted: its setup, the channel towards the listener, and the
/// channel back for duplex lanes.
type Incoming = (LaneSetup, Arc<Channel>, Option<Arc<Channel>>);

struct ListenerShared {
    bell: Arc<Doorbell>,
    incoming: Mutex<VecDeque<Incoming>>,
}

impl Provider for MemProvider {
    fn name(&self) -> &'static str {
        "mem"
    }

    fn listen(&self) -> Result<Box<dyn Listener>> {
        let id = NEXT_LISTENER.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(ListenerShared { bell: self.bell.clone(), incoming: Mutex::new(VecDeque::new()) });
        lock(registry()).insert(id, shared.clone());
        Ok(Box::new(MemListener { id, shared }))
    }

    fn connect(&self, handle: &[u8], setup: &LaneSetup) -> Result<Box<dyn Connecting>> {
        let id = handle
            .try_into()
            .ok()
            .map(u64::from_le_bytes)
            .and_then(|id| lock(registry()).get(&id).cloned())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "rank {}: no in-process listener for rank {} (mem transport needs all ranks in one process)",
                    setup.rank, setup.peer
                ))
            })?;
        let channel = |from: &Arc<Doorbell>, to: &Arc<Doorbell>| {
            Arc::new(Channel {
                state: Mutex::new(ChannelState::default()),
                sender_bell: from.clone(),
                receiver_bell: to.clone(),
            })
        };
        let out = channel(&self.bell, &id.bell);
        let back = setup.duplex.then(|| channel(&id.bell, &self.bell));
        lock(&id.incoming).push_back((*setup, out.clone(), back.clone()));
        id.bell.ring();
        Ok(Box::new(MemConnecting {
            ends: Some(LaneEnds {
                send: Some(Box::new(MemSendLane { channel: out, posted: 0, completed: 0 })),
                recv: back.map(|c| Box::new(MemRecvLane { channel: c, posted: VecDeque::new() }) as Box<dyn RecvLane>),
            }),
        }))
    }
}

struct MemListener {
    id: u64,
    shared: Arc<ListenerShared>,
}

impl Drop for MemListener {
    fn drop(&mut self) {
        lock(registry()).remove(&self.id);
    }
}

impl Listener for MemListener {
    fn handle(&self) -> Vec<u8> {
        self.id.to_le_bytes().to_vec()
    }

    fn accept(&mut self) -> Result<Option<(LaneSetup, LaneEnds)>> {
        Ok(lock(&self.shared.incoming).pop_front().map(|(setup, towards_us, back)| {
            let ends = LaneEnds {
                send: back.map(|c| Box::new(MemSendLane { channel: c, posted: 0, completed: 0 }) as Box<dyn SendLane>),
                recv: Some(Box::new(MemRecvLane { channel: towards_us, posted: VecDeque::new() })),
            };
            (setup, ends)
        }))
    }

    fn wait_sources(&self) -> Vec<WaitSource> {
        vec![WaitSource::Bell(self.shared.bell.clone())]
    }
}

struct MemConnecting {
    ends: Option<LaneEnds>,
}

impl Connecting for MemConnecting {
    fn poll(&mut self) -> Result<Option<LaneEnds>> {
        Ok(self.ends.take())
    }

    fn wait_source(&self) -> Option<WaitSource> {
        None
    }
}

#[derive(Clone, Copy)]
struct SendDesc {
    header: Header,
    data: usize,
    len: usize,
}

#[derive(Default)]
struct ChannelState {
    sends: VecDeque<SendDesc>,
    /// Sends the receiver has copied, counted from the start.
    completed: u64,
    sender_closed: bool,
    receiver_closed: bool,
    notice: Option<Vec<u8>>,
}

struct Channel {
    state: Mutex<ChannelState>,
    sender_bell: Arc<Doorbell>,
    receiver_bell: Arc<Doorbell>,
}

struct MemSendLane {
    channel: Arc<Channel>,
    posted: u64,
    completed: u64,
}

impl Drop for MemSendLane {
    fn drop(&mut self) {
        lock(&self.channel.state).sender_closed = true;
        self.channel.receiver_bell.ring();
    }
}

impl SendLane for MemSendLane {
    unsafe fn post(
        &mut self,
        header: &Header,
        data: *const u8,
        len: usize,
        _mr: Option<&MemoryRegion>,
    ) -> Result<(), LaneError> {
        {
            let mut st = lock(&self.channel.state);
            if st.receiver_closed {
                return Err(LaneError::Closed("the receiving rank closed the connection".into()));
            }
            st.sends.push_back(SendDesc { header: *header, data: data as usize, len });
        }
        self.posted += 1;
        self.channel.receiver_bell.ring();
        Ok(())
    }

    fn progress(&mut self) -> Result<usize, LaneError> {
        let st = lock(&self.channel.state);
        let newly = st.completed - self.completed;
        self.completed = st.completed;
        if newly == 0 && self.posted > self.completed && st.receiver_closed {
            return Err(LaneError::Closed("the receiving rank closed the connection".into()));
        }
        Ok(newly as usize)
    }

    fn queued(&self) -> usize {
        (self.posted - self.completed) as usize
    }

    fn check_peer(&mut self) -> Result<(), LaneError> {
        let mut st = lock(&self.channel.state);
        if let Some(n) = st.notice.take() {
            return Err(LaneError::Notice(n));
        }
        if st.receiver_closed && self.posted > st.completed {
            return Err(LaneError::Closed("the receiving rank closed the connection".into()));
        }
        Ok(())
    }

    fn wait_source(&self) -> Option<WaitSource> {
        Some(WaitSource::Bell(self.channel.sender_bell.clone()))
    }

    fn cancel(&mut self) {
        // The receiver copies under this lock, so once the queue is empty no copy of ours is
        // running or can start.
        let mut st = lock(&self.channel.state);
        st.sends.clear();
        self.posted = st.completed;
        self.completed = st.completed;
    }
}

struct MemRecvLane {
    channel: Arc<Channel>,
    posted: VecDeque<(Header, usize, usize)>,
}

impl Drop for MemRecvLane {
    fn drop(&mut self) {
        lock(&self.channel.state).receiver_closed = true;
        self.channel.sender_bell.ring();
    }
}

impl RecvLane for MemRecvLane {
    unsafe fn post(
        &mut self,
        expect: &Header,
        data: *mut u8,
        len: usize,
        _mr: Option<&MemoryRegion>,
    ) -> Result<(), LaneError> {
        self.posted.push_back((*expect, data as usize, len));
        Ok(())
    }

    fn progress(&mut self) -> Result<usize, LaneError> {
        let mut done = 0;
        let mut st = lock(&self.channel.state);
        while let Some(&(expect, dst, len)) = self.posted.front() {
            let Some(send) = st.sends.front().copied() else {
                if st.sender_closed {
                    return Err(LaneError::Closed("the sending rank closed the connection".into()));
                }
                break;
            };
            if send.header != expect || send.len != len {
                return Err(LaneError::Mismatch { expected: expect, got: send.header });
            }
            if len > 0 {
                // SAFETY: the sender keeps `send.data` valid until it sees the completion below;
                // the receiver owns `dst` for `len` bytes until this receive completes.
                unsafe { std::ptr::copy_nonoverlapping(send.data as *const u8, dst as *mut u8, len) };
            }
            st.sends.pop_front();
            st.completed += 1;
            self.posted.pop_front();
            done += 1;
        }
        drop(st);
        if done > 0 {
            self.channel.sender_bell.ring();
        }
        Ok(done)
    }

    fn queued(&self) -> usize {
        self.posted.len()
    }

    fn check_peer(&mut self) -> Result<(), LaneError> {
        let st = lock(&self.channel.state);
        if st.sender_closed && st.sends.is_empty() {
            return Err(LaneError::Closed("the sending rank closed the connection".into()));
        }
        Ok(())
    }

    fn send_notice(&mut self, notice: &[u8]) {
        lock(&self.channel.state).notice = Some(notice.to_vec());
        self.channel.sender_bell.ring();
    }

    fn cancel(&mut self) {
        self.posted.clear();
    }

    fn wait_source(&self) -> Option<WaitSource> {
        Some(WaitSource::Bell(self.channel.receiver_bell.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::HEADER_LEN;

    fn lanes() -> (MemSendLane, MemRecvLane) {
        let channel = Arc::new(Channel {
            state: Mutex::new(ChannelState::default()),
            sender_bell: Doorbell::new(),
            receiver_bell: Doorbell::new(),
        });
        let send = MemSendLane { channel: channel.clone(), posted: 0, completed: 0 };
        (send, MemRecvLane { channel, posted: VecDeque::new() })
    }

    #[test]
    fn cancelled_sends_are_never_read() {
        let (mut send, mut recv) = lanes();
        let header = [7u8; HEADER_LEN];
        let (first, second) = (vec![1u8; 64], vec![2u8; 64]);
        let mut dst = vec![0u8; 64];
        // SAFETY: both buffers outlive the posts: the first completes, the second is cancelled.
        unsafe {
            send.post(&header, first.as_ptr(), 64, None).unwrap();
            recv.post(&header, dst.as_mut_ptr(), 64, None).unwrap();
        }
        assert_eq!(recv.progress().unwrap(), 1);
        assert_eq!(send.progress().unwrap(), 1);
        // SAFETY: as above.
        unsafe { send.post(&header, second.as_ptr(), 64, None).unwrap() };
        send.cancel();
        assert_eq!(send.queued(), 0);
        dst.fill(0);
        // SAFETY: `dst` outlives the receive, which is cancelled below.
        unsafe { recv.post(&header, dst.as_mut_ptr(), 64, None).unwrap() };
        assert_eq!(recv.progress().unwrap(), 0, "a cancelled send was delivered");
        assert_eq!(dst, vec![0u8; 64]);
        recv.cancel();
        assert_eq!(recv.queued(), 0);
    }
}
