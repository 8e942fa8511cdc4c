//! The vhost-user control channel: one unix socket, one request at a time, every reply awaited
//! with a deadline.
//!
//! # Why not the rust-vmm `vhost` crate
//! Its frontend blocks forever when a backend answers GET_CONFIG with an empty error reply, and
//! retries forever on `EAGAIN` (see the project's notes). Here the socket is non-blocking and
//! every wait is a `poll(2)` bounded by the channel's timeout, so a dead or misbehaving backend
//! yields [`Error::ControlTimeout`], [`Error::Disconnected`] or [`Error::Protocol`], never a hang.
//!
//! # Locking
//! One mutex (`stream`) serialises whole request/reply exchanges: the grower thread (sharing
//! regions) and setup may both talk to the backend, and vhost-user replies are matched to requests
//! only by order. The mutex is held across the exchange's system calls, which is why no async task
//! may call into this module directly (setup runs it on a blocking thread; the pool's grower is a
//! thread of its own). [`Control::peer_hung_up`] never blocks on the mutex.
//!
//! # Failure model
//! Any I/O error, timeout or malformed reply leaves the byte stream in an unknown state, so the
//! channel is closed for good ("poisoned"): later calls fail at once with
//! [`Error::Disconnected`] naming the first cause.

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

use crate::protocol::{
    Header, Request, FLAG_NEED_REPLY, FLAG_REPLY, HEADER_LEN, MAX_REPLY_PAYLOAD, VERSION,
};
use crate::Error;

/// What a request expects back.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing (fire and forget).
    None,
    /// A REPLY_ACK `u64`: 0 is success.
    Ack,
    /// A payload of exactly this many bytes.
    Payload(usize),
}

/// The control channel to one backend.
#[derive(Debug)]
pub struct Control {
    /// The socket; `None` once closed or poisoned. Held for whole exchanges.
    stream: Mutex<Option<UnixStream>>,
    /// Why the channel died (first cause), for later errors.
    dead_reason: Mutex<Option<String>>,
    /// Fast flag mirroring `dead_reason.is_some()`.
    dead: AtomicBool,
    /// Bound on every wait for the peer.
    timeout: Duration,
}

impl Control {
    /// Connects to the backend's socket at `path`. Blocks at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Control, Error> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_nonblocking(true).map_err(|source| Error::Io {
            what: "making the control socket non-blocking",
            source,
        })?;
        Ok(Control {
            stream: Mutex::new(Some(stream)),
            dead_reason: Mutex::new(None),
            dead: AtomicBool::new(false),
            timeout,
        })
    }

    /// The timeout applied to each wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the channel was closed or poisoned.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// The error later calls get once the channel is dead.
    pub fn dead_error(&self) -> Error {
        let why = self
            .dead_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        Error::Disconnected(why)
    }

    /// Closes the channel (the backend sees a disconnect and drops every region and ring).
    /// Idempotent. Takes the stream lock.
    pub fn close(&self, why: &str) {
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        self.poison(&mut s, why.to_string());
    }

    /// Marks the channel dead with `why` (first cause wins) and shuts the socket. Call with the
    /// stream lock held (`slot` is its content).
    fn poison(&self, slot: &mut Option<UnixStream>, why: String) {
        if let Some(s) = slot.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let mut r = self.dead_reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(why);
        }
        self.dead.store(true, Ordering::Release);
    }

    /// True if the peer closed its end (or the socket failed), checked without blocking and
    /// without consuming data. Skips the check (returns false) while an exchange holds the
    /// lock: that exchange reports the failure itself.
    pub fn peer_hung_up(&self) -> bool {
        if self.is_dead() {
            return true;
        }
        let Ok(mut guard) = self.stream.try_lock() else {
            return false;
        };
        let Some(s) = guard.as_ref() else {
            return true;
        };
        let hung = hung_up(s.as_raw_fd());
        if hung {
            self.poison(&mut guard, "the backend closed the connection".into());
        }
        hung
    }

    /// Sends `request` with `payload` and `fds`, and waits for what `reply` says. Returns the
    /// reply payload (empty for [`Reply::None`] and [`Reply::Ack`]). Holds the stream lock for
    /// the whole exchange; poisons the channel on any failure but a clean non-zero ack.
    pub fn call(
        &self,
        request: Request,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        reply: Reply,
    ) -> Result<Vec<u8>, Error> {
        let mut guard = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let Some(stream) = guard.as_ref() else {
            return Err(self.dead_error());
        };
        let deadline = Instant::now() + self.timeout;
        let result = exchange(stream, request, payload, fds, reply, deadline, self.timeout);
        match result {
            Ok(r) => Ok(r),
            Err(e @ Error::Rejected { .. }) => Err(e),
            Err(e) => {
                self.poison(&mut guard, format!("{} failed: {e}", request.name()));
                Err(e)
            }
        }
    }
}

/// Whether `fd`'s peer hung up (`POLLRDHUP`, `POLLHUP` or `POLLERR`), without waiting and
/// without consuming data. (nix's `PollFlags` drops `POLLRDHUP`, so this calls libc.)
fn hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd on our stack; timeout 0 never blocks; `fd` is open (the caller
    // holds the stream lock, so the socket cannot be closed meanwhile).
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r < 0 || (r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Helper to borrow a stream's fd for `poll`.
trait BorrowFd {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
}

impl BorrowFd for UnixStream {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// One request/reply exchange on `stream`, every wait bounded by `deadline`.
fn exchange(
    stream: &UnixStream,
    request: Request,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
    reply: Reply,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, Error> {
    let mut flags = VERSION;
    if reply == Reply::Ack {
        flags |= FLAG_NEED_REPLY;
    }
    let header = Header {
        request: request as u32,
        flags,
        size: payload.len() as u32,
    }
    .encode();
    let mut msg = Vec::with_capacity(HEADER_LEN + payload.len());
    msg.extend_from_slice(&header);
    msg.extend_from_slice(payload);
    send_all(stream, &msg, fds, request, deadline, timeout)?;
    let want = match reply {
        Reply::None => return Ok(Vec::new()),
        Reply::Ack => 8,
        Reply::Payload(n) => n,
    };
    let mut hb = [0u8; HEADER_LEN];
    recv_exact(stream, &mut hb, request, deadline, timeout)?;
    let h = Header::decode(&hb);
    if h.request != request as u32 || h.flags & FLAG_REPLY == 0 {
        return Err(Error::Protocol(format!(
            "expected a reply to {} (code {}), got code {} flags {:#x}",
            request.name(),
            request as u32,
            h.request,
            h.flags
        )));
    }
    let size = h.size as usize;
    if size > MAX_REPLY_PAYLOAD {
        return Err(Error::Protocol(format!(
            "reply to {} claims {size} payload bytes (at most {MAX_REPLY_PAYLOAD} accepted)",
            request.name()
        )));
    }
    let mut body = vec![0u8; size];
    recv_exact(stream, &mut body, request, deadline, timeout)?;
    if size != want {
        return Err(Error::Protocol(format!(
            "reply to {} has {size} payload bytes, {want} expected (the backend refused it?)",
            request.name()
        )));
    }
    if reply == Reply::Ack {
        let code = u64::from_le_bytes(body[..8].try_into().expect("8 bytes checked above"));
        if code != 0 {
            return Err(Error::Rejected {
                request: request.name(),
                code,
            });
        }
        return Ok(Vec::new());
    }
    Ok(body)
}

/// Waits until `fd` is ready for `flags` or `deadline` passes.
fn wait_ready(
    fd: BorrowedFd<'_>,
    flags: PollFlags,
    request: Request,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::ControlTimeout {
                request: request.name(),
                timeout,
            });
        }
        let ms = PollTimeout::try_from(left.as_millis().max(1) as u64).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd, flags)];
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(Error::Io {
                    what: "poll on the control socket",
                    source: e.into(),
                })
            }
        }
    }
}

/// Sends all of `msg`, with `fds` attached to the first byte, bounded by `deadline`.
/// `MSG_NOSIGNAL`: a dead peer gives `EPIPE`, not a signal.
fn send_all(
    stream: &UnixStream,
    msg: &[u8],
    fds: &[BorrowedFd<'_>],
    request: Request,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < msg.len() {
        wait_ready(
            stream.as_fd_borrowed(),
            PollFlags::POLLOUT,
            request,
            deadline,
            timeout,
        )?;
        let iov = [IoSlice::new(&msg[sent..])];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &cmsg
        } else {
            &[]
        };
        match sendmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(Error::Disconnected(format!(
                    "sending {} to the backend failed: {e}",
                    request.name()
                )))
            }
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes, bounded by `deadline`. EOF is [`Error::Disconnected`].
fn recv_exact(
    mut stream: &UnixStream,
    buf: &mut [u8],
    request: Request,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let mut got = 0;
    while got < buf.len() {
        wait_ready(
            stream.as_fd_borrowed(),
            PollFlags::POLLIN,
            request,
            deadline,
            timeout,
        )?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(Error::Disconnected(format!(
                    "the backend closed the connection while we awaited the reply to {}",
                    request.name()
                )))
            }
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                return Err(Error::Disconnected(format!(
                    "reading the reply to {} failed: {e}",
                    request.name()
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn listener() -> (tempdir::Dir, UnixListener) {
        let d = tempdir::Dir::new();
        let l = UnixListener::bind(d.path.join("s")).unwrap();
        (d, l)
    }

    /// A tiny self-cleaning temp dir (no extra dependency).
    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                let path = std::env::temp_dir().join(format!(
                    "vhost-ctl-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn silent_backend_times_out_and_poisons() {
        let (d, l) = listener();
        let c = Control::connect(&d.path.join("s"), Duration::from_millis(100)).unwrap();
        let _peer = l.accept().unwrap();
        let t = Instant::now();
        let e = c
            .call(Request::GetFeatures, &[], &[], Reply::Payload(8))
            .unwrap_err();
        assert!(matches!(e, Error::ControlTimeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(c.is_dead());
        let e = c
            .call(Request::GetFeatures, &[], &[], Reply::Payload(8))
            .unwrap_err();
        assert!(matches!(e, Error::Disconnected(_)), "{e}");
    }

    #[test]
    fn empty_error_reply_to_get_config_is_an_error_not_a_hang() {
        use std::io::Write;
        let (d, l) = listener();
        let c = Control::connect(&d.path.join("s"), Duration::from_secs(2)).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        let h = std::thread::spawn(move || {
            let mut req = [0u8; 12 + 12 + 60];
            peer.read_exact(&mut req).unwrap();
            // What qemu-storage-daemon does with a size it dislikes: a reply with no payload.
            let reply = Header {
                request: Request::GetConfig as u32,
                flags: VERSION | FLAG_REPLY,
                size: 0,
            };
            peer.write_all(&reply.encode()).unwrap();
            peer
        });
        let e = c
            .call(Request::GetConfig, &[0u8; 72], &[], Reply::Payload(72))
            .unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        drop(h.join().unwrap());
    }

    #[test]
    fn hang_up_is_seen_without_blocking() {
        let (d, l) = listener();
        let c = Control::connect(&d.path.join("s"), Duration::from_secs(1)).unwrap();
        let (peer, _) = l.accept().unwrap();
        assert!(!c.peer_hung_up());
        drop(peer);
        assert!(c.peer_hung_up());
        assert!(matches!(
            c.call(Request::GetFeatures, &[], &[], Reply::Payload(8)),
            Err(Error::Disconnected(_))
        ));
    }
}
