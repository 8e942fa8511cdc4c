//! A scripted, in-process vhost-user-blk backend that can lie.
//!
//! It plays `qemu-storage-daemon`'s part for real: it listens on a Unix socket, answers the
//! handshake with the features and config space of its [`Script`], maps every memory region
//! the frontend sends (SET_MEM_TABLE / ADD_MEM_REG memfds, `mmap(MAP_SHARED)`, unmapped on
//! REM_MEM_REG), waits on the kick eventfds, follows the descriptor chains it finds in the
//! avail ring, executes them against an in-memory disk, writes the status bytes and the used
//! ring into the shared memory, and signals the call eventfds. Messages are decoded with the
//! crate's own [`protocol`](tidepool_vhost_user_blk::protocol) types and ring constants.
//!
//! Shared memory is touched only by copy, through `tidepool::copy` (the frontend may change
//! it at any time), never through a reference.
//!
//! The [`Behaviour`] decides how it completes requests: honestly, out of order, with bad used
//! entries, without a status byte, never, or by dying with requests in flight. It also records
//! ([`Log`]) every message and request it saw, and every frontend obligation it found broken
//! (a chain longer than the queue, a segment over a negotiated `size_max`, more segments than a
//! negotiated `seg_max`, an address outside every region...), so tests can check both sides.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use tidepool_vhost_user_blk::protocol::{
    blk, features, protocol_features, BlkConfig, Header, MemRegion, Reader, Request, Writer,
    FLAG_NEED_REPLY, FLAG_REPLY, HEADER_LEN, VERSION, VRING_NOFD_MASK,
};
use tidepool_vhost_user_blk::ring::{AVAIL_F_NO_INTERRUPT, DESC_F_NEXT, DESC_F_WRITE};

/// How the backend completes the requests it receives.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Every request completed at once, in order, correctly.
    Honest,
    /// The first `after` requests honestly; the next one's used entry names descriptor
    /// `queue size + 7`.
    IdOutOfRange { after: usize },
    /// The first `after` requests honestly; the next one's used entry names a descriptor of
    /// its chain that is not its head (so heads no outstanding request).
    IdNotOutstanding { after: usize },
    /// The first `after` requests honestly; the next one's used entry claims 4096 bytes more
    /// than its chain lets the device write.
    LenTooLarge { after: usize },
    /// The first `after` requests honestly; the next one is completed without its status
    /// byte being written.
    NoStatus { after: usize },
    /// Requests are held until `batch` are outstanding, then all completed, last first.
    Reverse { batch: usize },
    /// The first `completed` requests honestly (but without signalling the call eventfd
    /// unless `signal`); later ones are executed but held, and once `in_flight` are held the
    /// backend closes the connection (and everything else) and exits, as a crashing daemon
    /// would.
    DieWithInFlight {
        completed: usize,
        in_flight: usize,
        signal: bool,
    },
    /// Requests are read from the ring but never executed nor completed.
    Mute,
    /// Each request is answered as the next [`Forge`] of [`Script::forged`] says (honestly
    /// once they run out): for fuzzing.
    Forged,
}

/// How the backend answers one request under [`Behaviour::Forged`]. The request is always
/// executed against the disk first (reads fill the buffer, writes land).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Forge {
    /// The used entry's id, instead of the request's head.
    pub id: Option<u32>,
    /// The used entry's len, instead of the bytes written.
    pub len: Option<u32>,
    /// The status byte, instead of the honest one.
    pub status: Option<u8>,
    /// Leave the status byte unwritten.
    pub skip_status: bool,
    /// How far `used.idx` advances (1 for an honest backend; 0 hides the entry, more exposes
    /// stale slots).
    pub advance: u16,
    /// Signal the call eventfd afterwards.
    pub signal: bool,
    /// Hold the request: it is completed (honestly, after the later one) when the next
    /// request that is not held is answered.
    pub hold: bool,
    /// Close the connection instead of answering.
    pub die: bool,
}

impl Forge {
    /// The honest answer.
    pub fn honest() -> Forge {
        Forge {
            advance: 1,
            signal: true,
            ..Forge::default()
        }
    }
}

/// What the backend offers and how it behaves.
#[derive(Clone, Debug)]
pub struct Script {
    /// Virtio features offered (GET_FEATURES).
    pub features: u64,
    /// The config space served (GET_CONFIG), whatever the features say.
    pub config: BlkConfig,
    /// GET_QUEUE_NUM.
    pub queues: u64,
    /// GET_MAX_MEM_SLOTS.
    pub mem_slots: u64,
    /// How requests are completed.
    pub behaviour: Behaviour,
    /// The answers [`Behaviour::Forged`] gives, one per request in arrival order.
    pub forged: Vec<Forge>,
}

impl Script {
    /// What `qemu-storage-daemon` (7.2, 10.0) offers for a disk of `bytes` (its virtio-blk
    /// features, and VIRTIO_BLK_F_SIZE_MAX with a `size_max` of 0), one queue, completing
    /// honestly.
    pub fn honest(bytes: u64) -> Script {
        Script {
            features: features::VERSION_1
                | features::PROTOCOL_FEATURES
                | features::BLK_SIZE_MAX
                | features::BLK_SEG_MAX
                | features::BLK_BLK_SIZE
                | features::BLK_FLUSH
                | features::BLK_MQ
                | features::BLK_DISCARD
                | features::BLK_WRITE_ZEROES,
            config: BlkConfig {
                capacity_sectors: bytes / blk::SECTOR,
                size_max: 0,
                seg_max: 126,
                blk_size: 512,
                num_queues: 1,
                max_discard_sectors: 32768,
                max_write_zeroes_sectors: 32768,
            },
            queues: 1,
            mem_slots: 32,
            behaviour: Behaviour::Honest,
            forged: Vec::new(),
        }
    }

    /// The same script with `behaviour`.
    pub fn behaving(mut self, behaviour: Behaviour) -> Script {
        self.behaviour = behaviour;
        self
    }
}

/// One request as the backend found it in the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Queue index.
    pub queue: usize,
    /// virtio-blk request type.
    pub op: u32,
    /// The header's sector (DISCARD / WRITE_ZEROES: their segment's).
    pub sector: u64,
    /// Sectors a DISCARD / WRITE_ZEROES segment covers (0 for other requests).
    pub range_sectors: u32,
    /// Lengths of the data descriptors, in chain order.
    pub data: Vec<u32>,
    /// Descriptors in the whole chain.
    pub chain: usize,
}

/// What the backend saw and did.
#[derive(Clone, Debug, Default)]
pub struct Log {
    /// Every control message, in order.
    pub messages: Vec<Request>,
    /// Every request taken from a ring, in order.
    pub requests: Vec<Seen>,
    /// Frontend obligations found broken. Empty for a correct frontend.
    pub problems: Vec<String>,
    /// Why the backend stopped (set when its thread ends).
    pub end: Option<String>,
}

/// A running scripted backend. Its thread ends when the frontend closes the connection (or
/// when its behaviour makes it die).
pub struct Backend {
    pub socket: PathBuf,
    dir: PathBuf,
    log: Arc<Mutex<Log>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Listens on a fresh socket and serves one connection according to `script`.
    pub fn start(name: &str, script: Script) -> Backend {
        let dir = std::env::temp_dir().join(format!("vhost-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vhost.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let l2 = log.clone();
        let thread = std::thread::Builder::new()
            .name(format!("backend-{name}"))
            .spawn(move || {
                let why = serve(listener, script, &l2);
                l2.lock().unwrap().end = Some(why);
            })
            .unwrap();
        Backend {
            socket,
            dir,
            log,
            thread: Some(thread),
        }
    }

    /// A copy of the log so far.
    pub fn log(&self) -> Log {
        self.log.lock().unwrap().clone()
    }

    /// Waits (at most 10 s, else panics) for the backend's thread to end, and returns its log.
    pub fn finish(mut self) -> Log {
        let t = Instant::now();
        let thread = self.thread.take().unwrap();
        while !thread.is_finished() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the backend still has a connection: the frontend did not close it"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        thread.join().expect("the scripted backend panicked");
        self.log()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Accepts one frontend (within 10 s) and serves it. Returns why it stopped.
fn serve(listener: UnixListener, script: Script, log: &Arc<Mutex<Log>>) -> String {
    listener.set_nonblocking(true).unwrap();
    let t = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if t.elapsed() > Duration::from_secs(10) {
                    return "no frontend connected".into();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return format!("accept failed: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    let capacity = script.config.capacity_sectors * blk::SECTOR;
    let mut dev = Dev {
        forged: script.forged.iter().copied().collect(),
        script,
        acked: 0,
        regions: Vec::new(),
        vrings: Vec::new(),
        disk: vec![0u8; capacity as usize],
        completed: 0,
        log: log.clone(),
    };
    dev.run(&stream)
    // `dev` (mappings, eventfds) and `stream` drop here: the frontend sees a hang-up.
}

/// One region mapped into this thread's view of the frontend's memory.
struct Region {
    info: MemRegion,
    base: *mut u8,
    len: usize,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what our mmap returned, unmapped once, here.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Which of a region's two addresses an address is in (see the project notes).
#[derive(Copy, Clone, Debug)]
enum Space {
    /// Descriptor addresses.
    Guest,
    /// Ring addresses (SET_VRING_ADDR).
    User,
}

#[derive(Default)]
struct Vring {
    num: u16,
    last_avail: u16,
    used_idx: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    held: VecDeque<Pending>,
}

/// An executed request not yet completed.
struct Pending {
    head: u16,
    /// A descriptor of the chain that is not its head.
    not_head: u16,
    status: u8,
    status_addr: u64,
    /// Bytes written (data for reads, plus the status byte).
    written: u32,
    /// Bytes the chain lets the device write.
    writable: u32,
    /// The forged answer ([`Behaviour::Forged`]).
    forge: Option<Forge>,
}

/// How one used entry is written.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Entry {
    Forged(Forge),
    Honest,
    IdOutOfRange,
    IdNotOutstanding,
    LenTooLarge,
    NoStatus,
    /// Honest, but the call eventfd is not signalled.
    Quiet,
}

struct Dev {
    script: Script,
    /// The forged answers not used yet.
    forged: VecDeque<Forge>,
    acked: u64,
    regions: Vec<Region>,
    vrings: Vec<Vring>,
    disk: Vec<u8>,
    /// Requests completed (used entries written), all queues.
    completed: usize,
    log: Arc<Mutex<Log>>,
}

impl Dev {
    fn problem(&self, p: String) {
        self.log.lock().unwrap().problems.push(p);
    }

    /// Serves messages and kicks until the frontend hangs up or the behaviour says die.
    fn run(&mut self, stream: &UnixStream) -> String {
        loop {
            let mut fds = vec![libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let mut which = Vec::new();
            for (i, v) in self.vrings.iter().enumerate() {
                if let (true, Some(k)) = (v.enabled, &v.kick) {
                    fds.push(libc::pollfd {
                        fd: k.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    which.push(i);
                }
            }
            // SAFETY: `fds` is a valid array of pollfds on our stack, its length passed along.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return format!("poll failed: {e}");
            }
            if fds[0].revents != 0 {
                match self.message(stream) {
                    Ok(true) => {}
                    Ok(false) => return "the frontend closed the connection".into(),
                    Err(e) => return e,
                }
            }
            for (k, &q) in which.iter().enumerate() {
                if fds[k + 1].revents & libc::POLLIN == 0 {
                    continue;
                }
                let mut counter = [0u8; 8];
                if let Some(kick) = &self.vrings[q].kick {
                    let _ = (&*kick).read(&mut counter);
                }
                if let Err(why) = self.process(q) {
                    return why;
                }
            }
        }
    }

    /// Reads and answers one control message. `Ok(false)` on end-of-file.
    fn message(&mut self, stream: &UnixStream) -> Result<bool, String> {
        let mut hb = [0u8; HEADER_LEN];
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let (n, mut fds) = {
            let mut iov = [IoSliceMut::new(&mut hb)];
            let msg = recvmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| format!("recvmsg: {e}"))?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(|e| format!("cmsgs: {e}"))? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: a descriptor SCM_RIGHTS just installed in this process for
                        // us; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            (msg.bytes, fds)
        };
        if n == 0 {
            return Ok(false);
        }
        if n < HEADER_LEN && (&*stream).read_exact(&mut hb[n..]).is_err() {
            return Ok(false);
        }
        let h = Header::decode(&hb);
        if h.size > 4096 {
            return Err(format!(
                "message {} claims {} payload bytes",
                h.request, h.size
            ));
        }
        let mut body = vec![0u8; h.size as usize];
        if (&*stream).read_exact(&mut body).is_err() {
            return Ok(false);
        }
        let Some(req) = Request::from_code(h.request) else {
            self.problem(format!("unknown request code {}", h.request));
            return Err(format!("unknown request code {}", h.request));
        };
        self.log.lock().unwrap().messages.push(req);
        let reply = self
            .handle(req, &body, &mut fds)
            .map_err(|e| format!("{}: {e}", req.name()))?;
        let payload = match reply {
            Some(p) => p,
            None if h.flags & FLAG_NEED_REPLY != 0 => Writer::default().u64(0).0,
            None => return Ok(true),
        };
        let header = Header {
            request: h.request,
            flags: VERSION | FLAG_REPLY,
            size: payload.len() as u32,
        };
        let mut out = header.encode().to_vec();
        out.extend_from_slice(&payload);
        (&*stream)
            .write_all(&out)
            .map_err(|e| format!("replying to {}: {e}", req.name()))?;
        Ok(true)
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring, String> {
        let i = index as usize;
        if i >= self.script.queues as usize {
            return Err(format!(
                "vring {i} beyond the {} offered",
                self.script.queues
            ));
        }
        if self.vrings.len() <= i {
            self.vrings.resize_with(i + 1, Vring::default);
        }
        Ok(&mut self.vrings[i])
    }

    /// Handles one message; `Some(payload)` is a reply, `None` an ack if one was asked for.
    fn handle(
        &mut self,
        req: Request,
        body: &[u8],
        fds: &mut Vec<OwnedFd>,
    ) -> Result<Option<Vec<u8>>, String> {
        let mut r = Reader::new(body, req.name());
        let e = |e: tidepool_vhost_user_blk::Error| e.to_string();
        let u64_reply =
            |v: u64| -> Result<Option<Vec<u8>>, String> { Ok(Some(Writer::default().u64(v).0)) };
        match req {
            Request::GetFeatures => u64_reply(self.script.features),
            Request::GetProtocolFeatures => u64_reply(protocol_features::REQUIRED),
            Request::GetQueueNum => u64_reply(self.script.queues),
            Request::GetMaxMemSlots => u64_reply(self.script.mem_slots),
            Request::SetProtocolFeatures | Request::SetOwner => Ok(None),
            Request::SetFeatures => {
                self.acked = r.u64().map_err(e)?;
                if self.acked & !self.script.features != 0 {
                    self.problem(format!(
                        "SET_FEATURES {:#x} accepts features never offered ({:#x})",
                        self.acked, self.script.features
                    ));
                }
                Ok(None)
            }
            Request::GetConfig => {
                let (offset, size, flags) = (
                    r.u32().map_err(e)? as usize,
                    r.u32().map_err(e)? as usize,
                    r.u32().map_err(e)?,
                );
                let space = self.script.config.encode();
                let Some(bytes) = space.get(offset..offset + size) else {
                    return Ok(Some(Vec::new())); // qemu's answer to a size it dislikes
                };
                let w = Writer::default()
                    .u32(offset as u32)
                    .u32(size as u32)
                    .u32(flags);
                Ok(Some(w.bytes(bytes).0))
            }
            Request::SetMemTable => {
                let n = r.u32().map_err(e)? as usize;
                r.u32().map_err(e)?;
                if fds.len() != n {
                    return Err(format!("{n} regions but {} fds", fds.len()));
                }
                let mut regions = Vec::new();
                for fd in fds.drain(..) {
                    regions.push(map(MemRegion::decode(&mut r).map_err(e)?, fd)?);
                }
                self.regions = regions;
                Ok(None)
            }
            Request::AddMemReg => {
                r.u64().map_err(e)?;
                let info = MemRegion::decode(&mut r).map_err(e)?;
                let fd = fds.pop().ok_or("ADD_MEM_REG without a memfd")?;
                self.regions.push(map(info, fd)?);
                Ok(None)
            }
            Request::RemMemReg => {
                r.u64().map_err(e)?;
                let info = MemRegion::decode(&mut r).map_err(e)?;
                match self.regions.iter().position(|g| {
                    (
                        g.info.guest_phys_addr,
                        g.info.memory_size,
                        g.info.userspace_addr,
                    ) == (info.guest_phys_addr, info.memory_size, info.userspace_addr)
                }) {
                    Some(i) => drop(self.regions.swap_remove(i)),
                    None => self.problem(format!("REM_MEM_REG of an unknown region {info:?}")),
                }
                Ok(None)
            }
            Request::SetVringNum => {
                let (i, num) = (r.u32().map_err(e)?, r.u32().map_err(e)?);
                if num == 0 || num > 32768 || !num.is_power_of_two() {
                    return Err(format!("queue size {num}"));
                }
                self.vring(i)?.num = num as u16;
                Ok(None)
            }
            Request::SetVringBase => {
                let (i, base) = (r.u32().map_err(e)?, r.u32().map_err(e)?);
                let v = self.vring(i)?;
                v.last_avail = base as u16;
                v.used_idx = base as u16;
                Ok(None)
            }
            Request::SetVringAddr => {
                let i = r.u32().map_err(e)?;
                r.u32().map_err(e)?;
                let (desc, used, avail) = (
                    r.u64().map_err(e)?,
                    r.u64().map_err(e)?,
                    r.u64().map_err(e)?,
                );
                let v = self.vring(i)?;
                (v.desc, v.used, v.avail) = (desc, used, avail);
                Ok(None)
            }
            Request::SetVringCall | Request::SetVringKick => {
                let v = r.u64().map_err(e)?;
                let fd = if v & VRING_NOFD_MASK != 0 {
                    None
                } else {
                    Some(File::from(fds.pop().ok_or("no eventfd")?))
                };
                let ring = self.vring((v & 0xff) as u32)?;
                if req == Request::SetVringCall {
                    ring.call = fd;
                } else {
                    ring.kick = fd;
                }
                Ok(None)
            }
            Request::SetVringEnable => {
                let (i, on) = (r.u32().map_err(e)?, r.u32().map_err(e)?);
                self.vring(i)?.enabled = on != 0;
                Ok(None)
            }
        }
    }

    /// Where `addr..addr+len` of `space` lies in our mappings.
    fn at(&self, addr: u64, len: usize, space: Space) -> Result<*mut u8, String> {
        for g in &self.regions {
            let start = match space {
                Space::Guest => g.info.guest_phys_addr,
                Space::User => g.info.userspace_addr,
            };
            let end = start + g.info.memory_size;
            if addr >= start && addr.checked_add(len as u64).is_some_and(|e| e <= end) {
                // SAFETY: `addr - start + len <= memory_size == g.len`: inside the mapping.
                return Ok(unsafe { g.base.add((addr - start) as usize) });
            }
        }
        let p = format!("{space:?} address {addr:#x}+{len} lies in no region");
        self.problem(p.clone());
        Err(p)
    }

    /// Copies shared memory at `addr` into `out` (each byte read once).
    fn read(&self, addr: u64, space: Space, out: &mut [u8]) -> Result<(), String> {
        let p = self.at(addr, out.len(), space)?;
        // SAFETY: `p` is valid for `out.len()` bytes of our mapping (checked by `at`), which
        // cannot overlap the private `out`.
        unsafe { tidepool::copy::copy_from_device(p, out) };
        Ok(())
    }

    /// Copies `src` into shared memory at `addr`.
    fn write(&self, addr: u64, space: Space, src: &[u8]) -> Result<(), String> {
        let p = self.at(addr, src.len(), space)?;
        // SAFETY: as in `read`.
        unsafe { tidepool::copy::copy_to_device(src, p) };
        Ok(())
    }

    fn read_u16(&self, addr: u64) -> Result<u16, String> {
        let mut b = [0u8; 2];
        self.read(addr, Space::User, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Takes every new avail entry of queue `q`, executes it (unless mute) and completes
    /// what the behaviour says. `Err` ends the backend.
    fn process(&mut self, q: usize) -> Result<(), String> {
        let (num, avail) = (self.vrings[q].num, self.vrings[q].avail);
        if num == 0 {
            return Err(format!("kick on queue {q} before SET_VRING_NUM"));
        }
        let avail_idx = self.read_u16(avail + 2)?;
        fence(Ordering::Acquire);
        while self.vrings[q].last_avail != avail_idx {
            let slot = u64::from(self.vrings[q].last_avail % num);
            let head = self.read_u16(avail + 4 + 2 * slot)?;
            self.vrings[q].last_avail = self.vrings[q].last_avail.wrapping_add(1);
            if self.script.behaviour == Behaviour::Mute {
                continue;
            }
            let mut p = self.execute(q, head)?;
            if self.script.behaviour == Behaviour::Forged {
                p.forge = self.forged.pop_front();
            }
            self.vrings[q].held.push_back(p);
        }
        self.complete(q)
    }

    /// Completes held requests of queue `q` as the behaviour says.
    fn complete(&mut self, q: usize) -> Result<(), String> {
        match self.script.behaviour {
            Behaviour::Mute => Ok(()),
            Behaviour::Forged => {
                let mut held = std::mem::take(&mut self.vrings[q].held);
                let mut keep = VecDeque::new();
                while let Some(p) = held.pop_front() {
                    match p.forge {
                        Some(f) if f.die => return Err("died as forged".into()),
                        Some(f) if f.hold => keep.push_back(p),
                        f => {
                            self.used(q, p, f.map_or(Entry::Honest, Entry::Forged))?;
                            while let Some(h) = keep.pop_back() {
                                self.used(q, h, Entry::Honest)?;
                            }
                        }
                    }
                }
                self.vrings[q].held = keep;
                Ok(())
            }
            Behaviour::Reverse { batch } => {
                if self.vrings[q].held.len() >= batch {
                    while let Some(p) = self.vrings[q].held.pop_back() {
                        self.used(q, p, Entry::Honest)?;
                    }
                }
                Ok(())
            }
            Behaviour::DieWithInFlight {
                completed,
                in_flight,
                signal,
            } => {
                let how = if signal { Entry::Honest } else { Entry::Quiet };
                while self.completed < completed {
                    let Some(p) = self.vrings[q].held.pop_front() else {
                        break;
                    };
                    self.used(q, p, how)?;
                }
                let held: usize = self.vrings.iter().map(|v| v.held.len()).sum();
                if held >= in_flight {
                    return Err(format!("died with {held} requests in flight"));
                }
                Ok(())
            }
            b => {
                let (after, bad) = match b {
                    Behaviour::IdOutOfRange { after } => (after, Entry::IdOutOfRange),
                    Behaviour::IdNotOutstanding { after } => (after, Entry::IdNotOutstanding),
                    Behaviour::LenTooLarge { after } => (after, Entry::LenTooLarge),
                    Behaviour::NoStatus { after } => (after, Entry::NoStatus),
                    _ => (usize::MAX, Entry::Honest),
                };
                while let Some(p) = self.vrings[q].held.pop_front() {
                    let how = if self.completed == after {
                        bad
                    } else {
                        Entry::Honest
                    };
                    self.used(q, p, how)?;
                }
                Ok(())
            }
        }
    }

    /// Writes the status byte and a used entry for `p`, then signals the call eventfd unless
    /// the frontend asked for no interrupts.
    fn used(&mut self, q: usize, p: Pending, how: Entry) -> Result<(), String> {
        let forge = match how {
            Entry::Forged(f) => Some(f),
            _ => None,
        };
        if how != Entry::NoStatus && !forge.is_some_and(|f| f.skip_status) {
            let status = forge.and_then(|f| f.status).unwrap_or(p.status);
            self.write(p.status_addr, Space::Guest, &[status])?;
        }
        let v = &self.vrings[q];
        let (id, len) = match how {
            Entry::Forged(f) => (f.id.unwrap_or(p.head.into()), f.len.unwrap_or(p.written)),
            Entry::IdOutOfRange => (u32::from(v.num) + 7, p.written),
            Entry::IdNotOutstanding => (u32::from(p.not_head), p.written),
            Entry::LenTooLarge => (p.head.into(), p.writable + 4096),
            Entry::Honest | Entry::NoStatus | Entry::Quiet => (p.head.into(), p.written),
        };
        let slot = u64::from(v.used_idx % v.num);
        let entry = Writer::default().u32(id).u32(len).0;
        self.write(v.used + 4 + 8 * slot, Space::User, &entry)?;
        fence(Ordering::Release);
        let idx = v.used_idx.wrapping_add(forge.map_or(1, |f| f.advance));
        self.write(v.used + 2, Space::User, &idx.to_le_bytes())?;
        fence(Ordering::SeqCst);
        let flags = self.read_u16(v.avail)?;
        let v = &mut self.vrings[q];
        v.used_idx = idx;
        self.completed += 1;
        let signal = how != Entry::Quiet && forge.is_none_or(|f| f.signal);
        if flags & AVAIL_F_NO_INTERRUPT == 0 && signal {
            if let Some(call) = &v.call {
                let _ = (&*call).write(&1u64.to_ne_bytes());
            }
        }
        Ok(())
    }

    /// Follows the chain at `head`, checks it, executes it against the disk. `Err` (a chain
    /// the backend cannot follow) ends the backend, as it would end qemu's.
    fn execute(&mut self, q: usize, head: u16) -> Result<Pending, String> {
        let (num, desc) = (self.vrings[q].num, self.vrings[q].desc);
        let mut chain = Vec::new();
        let mut i = head;
        loop {
            if i >= num || chain.len() >= usize::from(num) {
                let p = format!("chain from {head} leaves or loops in a queue of {num}");
                self.problem(p.clone());
                return Err(p);
            }
            let mut d = [0u8; 16];
            self.read(desc + 16 * u64::from(i), Space::User, &mut d)?;
            let mut r = Reader::new(&d, "descriptor");
            let (addr, len, flags, next) = (
                r.u64().unwrap(),
                r.u32().unwrap(),
                r.u16().unwrap(),
                r.u16().unwrap(),
            );
            chain.push((i, addr, len, flags & DESC_F_WRITE != 0));
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            i = next;
        }
        let (hdr, last) = (chain[0], chain[chain.len() - 1]);
        if chain.len() < 2 || hdr.3 || hdr.2 != 16 || !last.3 || last.2 < 1 {
            let p = format!("malformed request chain {chain:?}");
            self.problem(p.clone());
            return Err(p);
        }
        let mut h = [0u8; 16];
        self.read(hdr.1, Space::Guest, &mut h)?;
        let mut r = Reader::new(&h, "request header");
        let op = r.u32().unwrap();
        r.u32().unwrap();
        let sector = r.u64().unwrap();
        let data = &chain[1..chain.len() - 1];
        let cfg = self.script.config;
        // A size_max of 0 sets no limit (qemu-storage-daemon serves 0 with the bit).
        if self.acked & features::BLK_SIZE_MAX != 0 && cfg.size_max > 0 {
            if let Some(d) = data.iter().find(|d| d.2 > cfg.size_max) {
                self.problem(format!(
                    "a {} B segment exceeds the negotiated size_max {}",
                    d.2, cfg.size_max
                ));
            }
        }
        if self.acked & features::BLK_SEG_MAX != 0 && data.len() > cfg.seg_max.max(1) as usize {
            self.problem(format!(
                "{} segments exceed the negotiated seg_max {}",
                data.len(),
                cfg.seg_max
            ));
        }
        let total: usize = data.iter().map(|d| d.2 as usize).sum();
        let mut seen = Seen {
            queue: q,
            op,
            sector,
            range_sectors: 0,
            data: data.iter().map(|d| d.2).collect(),
            chain: chain.len(),
        };
        let disk_len = self.disk.len() as u64;
        let in_disk = |sector: u64, bytes: u64| {
            sector
                .checked_mul(blk::SECTOR)
                .and_then(|s| s.checked_add(bytes))
                .is_some_and(|end| end <= disk_len)
        };
        let mut written = 1u32;
        let status = match op {
            blk::T_IN | blk::T_OUT if data.iter().any(|d| d.3 != (op == blk::T_IN)) => {
                self.problem(format!(
                    "op {op} with data descriptors of the wrong direction"
                ));
                blk::S_IOERR
            }
            blk::T_IN | blk::T_OUT if !in_disk(sector, total as u64) => blk::S_IOERR,
            blk::T_IN => {
                let mut at = (sector * blk::SECTOR) as usize;
                for d in data {
                    let bytes = self.disk[at..at + d.2 as usize].to_vec();
                    self.write(d.1, Space::Guest, &bytes)?;
                    at += d.2 as usize;
                }
                written += total as u32;
                blk::S_OK
            }
            blk::T_OUT => {
                let mut at = (sector * blk::SECTOR) as usize;
                for d in data {
                    let mut bytes = vec![0u8; d.2 as usize];
                    self.read(d.1, Space::Guest, &mut bytes)?;
                    self.disk[at..at + bytes.len()].copy_from_slice(&bytes);
                    at += bytes.len();
                }
                blk::S_OK
            }
            blk::T_FLUSH => blk::S_OK,
            blk::T_DISCARD | blk::T_WRITE_ZEROES => {
                let mut seg = Vec::new();
                for d in data {
                    let mut bytes = vec![0u8; d.2 as usize];
                    self.read(d.1, Space::Guest, &mut bytes)?;
                    seg.extend_from_slice(&bytes);
                }
                let mut r = Reader::new(&seg, "discard segment");
                match (r.u64(), r.u32()) {
                    (Ok(s), Ok(n)) if in_disk(s, u64::from(n) * blk::SECTOR) => {
                        seen.sector = s;
                        seen.range_sectors = n;
                        let at = (s * blk::SECTOR) as usize;
                        self.disk[at..at + n as usize * blk::SECTOR as usize].fill(0);
                        blk::S_OK
                    }
                    _ => blk::S_IOERR,
                }
            }
            _ => blk::S_UNSUPP,
        };
        self.log.lock().unwrap().requests.push(seen);
        Ok(Pending {
            head,
            not_head: chain[1].0,
            status,
            status_addr: last.1,
            written,
            writable: chain.iter().filter(|d| d.3).map(|d| d.2).sum(),
            forge: None,
        })
    }
}

/// Maps a region the frontend sent, shared, read-write.
fn map(info: MemRegion, fd: OwnedFd) -> Result<Region, String> {
    let len = info.memory_size as usize;
    // SAFETY: a fresh shared mapping of a memfd we own; the kernel picks the address, so it
    // overlaps nothing of ours. The fd may close afterwards: the mapping keeps the file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            info.mmap_offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mmap of region {info:?} failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Region {
        info,
        base: p.cast(),
        len,
    })
}
