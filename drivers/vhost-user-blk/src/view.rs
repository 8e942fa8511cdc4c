//! [`VhostUserView`]: the pool's chunks become vhost-user memory regions.
//!
//! # What "sharing" means here
//! In a confidential VM the host can reach only memory the guest shared explicitly. Over
//! vhost-user, the backend process can reach only the memfds the frontend hands it. This view
//! hands it exactly the pool's chunks, one region each: the first with SET_MEM_TABLE, later
//! ones with ADD_MEM_REG, and removes a chunk's region with REM_MEM_REG when the pool gives the
//! chunk back. Nothing else of this process is ever visible to the backend.
//!
//! # Addresses
//! vhost-user has two address spaces per region (see the project notes): descriptors carry
//! `guest_phys_addr`, ring addresses (SET_VRING_ADDR) carry `userspace_addr`. Both are chosen
//! here from a private counter, so the backend never learns our virtual addresses:
//! `guest_phys_addr` comes from [`VhostUserView`]'s bump allocator (2 MiB aligned, never
//! reused), and `userspace_addr = guest_phys_addr + UADDR_OFFSET`. The pool's [`DeviceAddr`]
//! is the `guest_phys_addr`.
//!
//! # Slots
//! The backend has `max_mem_slots` slots, the SET_MEM_TABLE region included (`qemu-storage-daemon`
//! reported 32 in the build these notes were first written against, 509 in 10.0.2); one region
//! beyond them makes it panic and drop the connection. [`DeviceView::usage`]
//! reports the limit so that the pool's grower sizes chunks to keep its cap reachable, and
//! `share` refuses a region beyond it with [`ShareError::MappingLimit`] before sending anything.
//!
//! # Correctness of removal
//! REM_MEM_REG does not wait for in-flight I/O (notes, pitfall 4). The pool calls `unshare`
//! only for a chunk with no buffer allocated, and every in-flight request owns its buffers
//! until its completion is reaped (see [`crate::device`]), so a removed region has no I/O.
//!
//! # Locking
//! `state` is held across each share/unshare exchange (so regions are added and removed in the
//! order slots are counted); only setup and the pool's grower thread call them. The control
//! channel's own lock nests inside. `usage()` reads atomic mirrors and never waits for it.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidepool::memory::HostRegion;
use tidepool::share::{DeviceView, ShareError, ShareUsage};
use tidepool::DeviceAddr;

use crate::connection::Connection;
use crate::control::Reply;
use crate::protocol::{MemRegion, Request, Writer};
use crate::Error;

/// `userspace_addr - guest_phys_addr` for every region: ring addresses are device addresses
/// plus this. Distinct from 0 so that mixing up the two spaces fails loudly in testing.
pub const UADDR_OFFSET: u64 = 0x1000_0000_0000;

/// First `guest_phys_addr` handed out.
const FIRST_GPA: u64 = 0x1_0000_0000;

/// Region alignment in the made-up address spaces (hugetlb regions are 2 MiB multiples).
const GPA_ALIGN: u64 = 2 << 20;

/// Options for [`VhostUserView`].
#[derive(Clone, Debug, Default)]
pub struct ViewOptions {
    /// Extra cost per MiB shared, slept in `share` (default 0): models the page-state changes
    /// (e.g. TDX/SEV-SNP "accept"/"share" hypercalls) a confidential VM pays to share memory,
    /// so that growth policies can be measured under realistic costs.
    pub share_cost_per_mib: Duration,
    /// Do a GET_FEATURES round trip after each region change to prove the backend survived it
    /// (default true: its ack is 0 even after a panic).
    pub verify_after_change: bool,
}

impl ViewOptions {
    /// The defaults: no extra cost, verify every change.
    pub fn new() -> ViewOptions {
        ViewOptions {
            share_cost_per_mib: Duration::ZERO,
            verify_after_change: true,
        }
    }
}

/// One region registered with the backend.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Live {
    host_start: usize,
    region: MemRegion,
}

#[derive(Debug)]
struct State {
    live: Vec<Live>,
    next_gpa: u64,
    table_sent: bool,
}

/// A [`DeviceView`] whose "device" is a vhost-user backend: sharing a chunk registers its
/// memfd as a region. See the module doc.
///
/// ```no_run
/// # fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tidepool::pool::{Pool, PoolConfig};
/// use tidepool_vhost_user_blk::{Connection, ConnectOptions, VhostUserView, ViewOptions};
///
/// let conn = Connection::connect("/tmp/vhost.sock".as_ref(), &ConnectOptions::default())?;
/// let view = Arc::new(VhostUserView::new(conn.clone(), ViewOptions::new()));
/// let pool = Pool::new(view, PoolConfig::default())?; // prefill → SET_MEM_TABLE
/// # let _ = pool; Ok(()) }
/// ```
#[derive(Debug)]
pub struct VhostUserView {
    conn: Arc<Connection>,
    opts: ViewOptions,
    state: Mutex<State>,
    /// Mirrors of `state.live.len()` and its total bytes, written under `state`, read
    /// without it by `usage()` (which async code may call while a region change blocks).
    mappings: AtomicU64,
    bytes: AtomicU64,
}

impl VhostUserView {
    /// A view over `conn`'s memory table (empty until the first `share`).
    pub fn new(conn: Arc<Connection>, opts: ViewOptions) -> VhostUserView {
        VhostUserView {
            conn,
            opts,
            state: Mutex::new(State {
                live: Vec::new(),
                next_gpa: FIRST_GPA,
                table_sent: false,
            }),
            mappings: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// The connection it registers regions on.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.conn
    }

    /// Sends one region change and, if configured, proves the backend survived it.
    fn send_region(
        &self,
        request: Request,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        self.conn.control.call(request, payload, fds, Reply::Ack)?;
        if self.opts.verify_after_change {
            self.conn.probe()?;
        }
        Ok(())
    }
}

/// Turns a frontend error into the pool's error type, keeping the message.
fn share_error(what: &'static str, e: Error) -> ShareError {
    ShareError::Os {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

impl DeviceView for VhostUserView {
    /// Registers `region`'s memfd with the backend at a fresh made-up address. Blocks (one or
    /// two control round trips, plus the configured share cost). Takes `state`.
    fn share(&self, region: &HostRegion<'_>) -> Result<DeviceAddr, ShareError> {
        let Some(fd) = region.fd else {
            return Err(ShareError::Unsuitable(
                "vhost-user needs memfd-backed memory (a pool chunk), not plain memory".into(),
            ));
        };
        if region.len == 0 || region.len % region.page_size != 0 {
            return Err(ShareError::Unsuitable(format!(
                "{} B is not a whole number of {} B pages",
                region.len, region.page_size
            )));
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let limit = self.conn.max_mem_slots;
        if st.live.len() as u64 >= limit {
            return Err(ShareError::MappingLimit {
                used: st.live.len() as u64,
                limit,
            });
        }
        let gpa = st.next_gpa;
        let r = MemRegion {
            guest_phys_addr: gpa,
            memory_size: region.len as u64,
            userspace_addr: gpa + UADDR_OFFSET,
            mmap_offset: 0,
        };
        let result = if st.table_sent {
            let payload = r.encode(Writer::default().u64(0)).0;
            self.send_region(Request::AddMemReg, &payload, &[fd])
                .map_err(|e| share_error("vhost-user ADD_MEM_REG", e))
        } else {
            let payload = r.encode(Writer::default().u32(1).u32(0)).0;
            self.send_region(Request::SetMemTable, &payload, &[fd])
                .map_err(|e| share_error("vhost-user SET_MEM_TABLE", e))
        };
        result?;
        st.table_sent = true;
        st.next_gpa = (gpa + region.len as u64).next_multiple_of(GPA_ALIGN);
        st.live.push(Live {
            host_start: region.start(),
            region: r,
        });
        self.bytes.fetch_add(region.len as u64, Ordering::Relaxed);
        self.mappings.store(st.live.len() as u64, Ordering::Relaxed);
        drop(st);
        let cost = self
            .opts
            .share_cost_per_mib
            .mul_f64(region.len as f64 / (1u64 << 20) as f64);
        if !cost.is_zero() {
            std::thread::sleep(cost);
        }
        Ok(DeviceAddr(gpa))
    }

    /// Removes the region registered for exactly this chunk at exactly `addr` (REM_MEM_REG).
    /// If the connection is already closed the backend holds no regions any more, so this only
    /// forgets it. Takes `state`.
    fn unshare(&self, region: &HostRegion<'_>, addr: DeviceAddr) -> Result<(), ShareError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let pos = st.live.iter().position(|l| {
            l.host_start == region.start()
                && l.region.memory_size == region.len as u64
                && l.region.guest_phys_addr == addr.0
        });
        let Some(pos) = pos else {
            return Err(ShareError::NotShared {
                addr: region.start(),
                len: region.len,
                iova: addr.0,
            });
        };
        let live = st.live[pos];
        if !self.conn.is_closed() {
            let payload = live.region.encode(Writer::default().u64(0)).0;
            match self.send_region(Request::RemMemReg, &payload, &[]) {
                Ok(()) => {}
                // The backend is gone: it maps nothing any more.
                Err(Error::Disconnected(_)) if self.conn.is_closed() => {}
                Err(e) => return Err(share_error("vhost-user REM_MEM_REG", e)),
            }
        }
        st.live.swap_remove(pos);
        self.bytes
            .fetch_sub(live.region.memory_size, Ordering::Relaxed);
        self.mappings.store(st.live.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Regions and bytes registered, and the backend's slot limit. Lock-free.
    fn usage(&self) -> ShareUsage {
        ShareUsage {
            mappings: self.mappings.load(Ordering::Relaxed),
            mapping_limit: Some(self.conn.max_mem_slots),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    fn kind(&self) -> &'static str {
        "vhost-user"
    }

    /// The connection's address space: every view of one connection registers regions in the
    /// same backend memory table, so they share one domain ([`Connection::domain`]).
    fn domain(&self) -> tidepool::share::DomainId {
        self.conn.domain()
    }
}
