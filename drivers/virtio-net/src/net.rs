//! [`VirtioNet`]: a virtio-net device driven from userspace, one RX and one TX queue, every
//! ring and packet buffer from a Tidepool [`Pool`].
//!
//! ## Data path
//! - **RX.** [`VirtioNet::refill_rx`] posts 2 KiB buffers (12-byte virtio-net header + up to a
//!   1514-byte frame) taken with the pool's immediate path, [`Pool::try_alloc`]: a poller never
//!   blocks on the pool; when the pool is exhausted fewer buffers are posted (counted in
//!   [`NetStats::rx_alloc_failures`]) and the next refill tries again.
//!   [`VirtioNet::recv_batch`] pops validated completions and hands each frame to the caller as
//!   an [`RxFrame`] that *owns the pool buffer the device wrote*: no copy is made by the driver;
//!   dropping the frame returns the buffer to the pool, and handing it back with
//!   [`VirtioNet::recycle_rx`] lets the driver post it again without the pool's zeroing (up to
//!   one ring's worth are kept). That is safe because an [`RxFrame`] is read-only: a recycled
//!   buffer holds only bytes this device wrote into it (and the pool's zeros), so posting it
//!   again shows the device nothing it did not write itself. Buffers of another pool are not
//!   kept. Every receive refills the ring, recycled buffers first.
//! - **TX.** [`VirtioNet::send_batch`] bounces caller frames through pool buffers (header zeroed,
//!   frame copied with Tidepool's copy routine); [`VirtioNet::tx_buffer`] +
//!   [`VirtioNet::send_buffers`] send pool buffers the caller filled in place (zero-copy).
//!   A batch is published with one `avail.idx` store and at most one doorbell. Completed TX
//!   buffers are reaped at the start of every send and by [`VirtioNet::reap_tx`]: bounce
//!   buffers are kept for reuse (up to one ring's worth per size class, [`TX_SPARE_LIMIT`]),
//!   the rest go back to the pool. Reuse skips the pool's zeroing of a fresh buffer, which
//!   is safe because a recycled buffer only ever held frames this driver gave to this same
//!   device. The driver never writes the 12-byte virtio header of a TX buffer after the pool
//!   zeroed it, so it is not rewritten on reuse either: only the device itself could have
//!   changed it (the IOMMU mapping is read-write), and then it only misleads itself.
//! - **Modes.** Polling (the default: interrupts suppressed with `VIRTQ_AVAIL_F_NO_INTERRUPT`)
//!   or async on tokio ([`VirtioNet::recv_async`], [`VirtioNet::send_async`]): MSI-X vector 0
//!   (RX) and 1 (TX) signal eventfds registered with the reactor; the driver re-enables
//!   interrupts, re-checks the ring (closing the race with a completion that arrived while they
//!   were off) and only then sleeps.
//!
//! ## Teardown
//! Dropping the driver resets the device (status 0, waited for) *before* the queues release
//! their buffers, so no buffer returns to the pool while the device may still write it. If the
//! reset times out, the posted buffers and rings are leaked instead (their pool space is lost,
//! never reused under the device's feet).
//!
//! ## Locking
//! None inside: one `VirtioNet` is used by one task (`&mut self` everywhere). The pool is
//! shared and thread-safe.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use tidepool::data::Recycler;
use tidepool::device::vfio::VfioDevice;
use tidepool::device::PciDevice;
use tidepool::pool::{DmaBuf, Pool, PoolConfig, PoolError};
use tidepool::share::DeviceView;
use tokio::io::unix::AsyncFd;

use crate::virtio::pci::NO_VECTOR;
use crate::virtio::queue::SplitQueue;
use crate::virtio::{features, RingError, VirtioError, VirtioPci};

/// virtio device type of a network card.
pub const VIRTIO_NET_TYPE: u16 = 1;
/// The virtio-net header with VERSION_1 (§5.1.6): 12 bytes, even without MRG_RXBUF.
pub const NET_HDR_LEN: usize = 12;
/// The largest Ethernet frame without FCS at MTU 1500: 1514 bytes.
pub const MAX_FRAME: usize = 1514;
/// The smallest frame accepted for sending: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// RX buffer size: header + the largest frame, rounded to the pool's 2 KiB class.
pub const RX_BUFFER: usize = 2048;

/// Feature: the device has a MAC address in its configuration.
pub const F_MAC: u64 = 1 << 5;
/// Feature: the device reports link status.
pub const F_STATUS: u64 = 1 << 16;

/// Bounce buffers kept for reuse per size class (512 B, 1 KiB, 2 KiB).
pub const TX_SPARE_LIMIT: usize = 256;
/// Size classes of TX bounce buffers: 512 B, 1 KiB, 2 KiB.
const TX_CLASSES: [usize; 3] = [512, 1024, 2048];
// The largest frame with its header fits the largest TX class and an RX buffer.
const _: () = assert!(
    NET_HDR_LEN + MAX_FRAME <= TX_CLASSES[TX_CLASSES.len() - 1]
        && NET_HDR_LEN + MAX_FRAME <= RX_BUFFER
);

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const RX_VECTOR: usize = 0;
const TX_VECTOR: usize = 1;

/// What went wrong in the net driver, each variant saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Transport or setup failure.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// The device broke the ring rules.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The pool failed (other than being momentarily empty on the immediate path).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A frame longer than the MTU allows.
    #[error("frame of {len} B is larger than the {max} B an MTU of 1500 allows; split it (this driver negotiates no TSO/GSO)")]
    FrameTooLarge {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A frame shorter than an Ethernet header.
    #[error("frame of {len} B is shorter than an Ethernet header ({min} B)")]
    FrameTooShort {
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// The async mode needs MSI-X eventfds.
    #[error("async mode needs interrupts: open the device with NetConfig::interrupts = true")]
    NoInterrupts,
    /// Waiting on an interrupt eventfd failed.
    #[error("waiting for an interrupt failed: {0}; is this running inside a tokio runtime with IO enabled?")]
    Wait(std::io::Error),
    /// A buffer (or pool) of another DMA domain was given to this device: it would DMA to
    /// whatever this domain has at that address. Use buffers of this device's pool.
    #[error("buffer belongs to {buffer}, but this device DMAs through {device}: use a buffer from the device's pool or from a pool over its container")]
    ForeignBuffer {
        /// The buffer's domain.
        buffer: tidepool::share::DomainId,
        /// The device's domain.
        device: tidepool::share::DomainId,
    },
}

/// How to open a [`VirtioNet`].
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Entries per queue (power of two; clamped to what the device supports). Default 256.
    pub queue_size: u16,
    /// Route MSI-X vectors to eventfds (needed for the async mode). Default true.
    pub interrupts: bool,
    /// Features to decline even when offered (diagnostics and tests; 0 normally).
    pub refuse_features: u64,
    /// How long a reset may take. Default 1 s.
    pub reset_timeout: Duration,
    /// The pool [`VirtioNet::open`] creates. Default: 4 MiB chunks, 4 MiB prefill, 64 MiB cap,
    /// 256 KiB reserve for the immediate path, no transient chunks (the hot path must not mmap).
    pub pool: PoolConfig,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            queue_size: 256,
            interrupts: true,
            refuse_features: 0,
            reset_timeout: Duration::from_secs(1),
            pool: PoolConfig {
                chunk_bytes: 4 << 20,
                prefill_bytes: 4 << 20,
                max_bytes: 64 << 20,
                max_buffer: 64 << 10,
                low_watermark: 1 << 20,
                high_watermark: 6 << 20,
                reserve_bytes: 256 << 10,
                transient: false,
                ..PoolConfig::default()
            },
        }
    }
}

/// Counters of one driver instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetStats {
    /// Frames received (handed to the caller).
    pub rx_frames: u64,
    /// Their bytes (without the virtio header).
    pub rx_bytes: u64,
    /// Completions shorter than the virtio header (dropped).
    pub rx_runts: u64,
    /// Times a refill stopped because the pool's immediate path had nothing.
    pub rx_alloc_failures: u64,
    /// RX buffers posted again from [`VirtioNet::recycle_rx`] instead of the pool.
    pub rx_recycled: u64,
    /// Frames queued for sending.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// TX buffers the device completed.
    pub tx_completed: u64,
    /// Doorbells rung (both queues).
    pub notifications: u64,
}

/// A received frame: the pool buffer the device wrote, owned by the caller. Dropping it
/// returns the buffer to the pool.
///
/// The bytes live in device-visible memory: read them by copy ([`RxFrame::read_at`],
/// [`RxFrame::to_vec`]) or, knowing the device is done with the buffer (it is: the device
/// completed it and it is no longer posted), borrow them with the unsafe [`RxFrame::as_slice`].
#[derive(Debug)]
pub struct RxFrame {
    buf: DmaBuf,
    len: usize,
}

impl RxFrame {
    /// Frame length (Ethernet header onwards, no virtio header).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length frame (a header-only completion).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies frame bytes from `offset` into `dst` (which must fit inside the frame).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), PoolError> {
        check_frame_range(offset, dst.len(), self.len)?;
        self.buf.read_at(NET_HDR_LEN + offset, dst)
    }

    /// The frame copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // In bounds by construction (len ≤ posted - header).
        let _ = self.buf.read_at(NET_HDR_LEN, &mut v);
        v
    }

    /// Borrows the frame in place (zero-copy).
    ///
    /// # Safety
    /// No device may write the buffer while the borrow lives: true for a well-behaved device
    /// (it completed the buffer), not guaranteed for a hostile one, which can still reach it
    /// through the IOMMU mapping. Do not use it where a hostile device is in the threat model
    /// and a torn read matters.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is inside our buffer; the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(NET_HDR_LEN), self.len) }
    }

    /// The underlying pool buffer (virtio header at 0, frame at [`NET_HDR_LEN`]).
    pub fn into_buf(self) -> DmaBuf {
        self.buf
    }
}

/// A pool buffer to send in place: the caller writes the frame, the driver queues it without a
/// copy. Get one from [`VirtioNet::tx_buffer`].
#[derive(Debug)]
pub struct TxBuf {
    buf: DmaBuf,
    len: usize,
}

impl TxBuf {
    /// Frame length that will be sent.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` into the frame at `offset` (must fit inside the frame length).
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), PoolError> {
        check_frame_range(offset, src.len(), self.len)?;
        self.buf.write_at(NET_HDR_LEN + offset, src)
    }

    /// Copies frame bytes from `offset` into `dst` (must fit inside the frame length): lets a
    /// caller of [`VirtioNet::tx_buffer_reused`] see what the recycled buffer holds.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), PoolError> {
        check_frame_range(offset, dst.len(), self.len)?;
        self.buf.read_at(NET_HDR_LEN + offset, dst)
    }

    /// The frame's first byte in this process (after the virtio header), for callers that
    /// build frames in place with raw writes. The buffer is not posted yet, so no device uses it.
    pub fn frame_ptr(&mut self) -> *mut u8 {
        self.buf.as_ptr().wrapping_add(NET_HDR_LEN)
    }
}

/// An eventfd registered with tokio's reactor; does not own the fd (the transport does).
struct IrqFd(RawFd);

impl AsRawFd for IrqFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Registers an eventfd owned by the transport with tokio's reactor (read interest).
fn register_irq_fd(fd: RawFd) -> Result<AsyncFd<IrqFd>, NetError> {
    // SAFETY: `fd` is an eventfd owned by the VirtioPci inside the same VirtioNet; it is neither
    // closed nor replaced while the AsyncFd exists, because `VirtioNet::irq` is cleared (and
    // declared, so dropped) before the transport disables MSI-X and closes the eventfds.
    unsafe { AsyncFd::register_with_interest(IrqFd(fd), tokio::io::Interest::READABLE) }
        .map_err(|e| NetError::Wait(std::io::Error::other(e.to_string())))
}

/// A virtio-net device driven from userspace. See the module docs.
pub struct VirtioNet {
    // Field order matters for drop: the reactor registrations go before the transport closes
    // the eventfds; the queues are emptied by `Drop` after the reset.
    irq: Vec<AsyncFd<IrqFd>>,
    rx: Option<SplitQueue>,
    tx: Option<SplitQueue>,
    transport: VirtioPci,
    pool: Pool,
    mac: [u8; 6],
    features: u64,
    stats: NetStats,
    reset_timeout: Duration,
    rx_target: usize,
    /// Completed TX bounce buffers kept for reuse, by size class (module docs).
    tx_spare: Recycler,
    /// RX buffers the caller handed back ([`VirtioNet::recycle_rx`]), posted again before new
    /// ones are allocated (module docs); at most `rx_target`.
    rx_spare: Recycler,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("transport", &self.transport)
            .field("mac", &format_mac(&self.mac))
            .field("features", &format_args!("{:#x}", self.features))
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The recycler of TX bounce buffers: one class per size, [`TX_SPARE_LIMIT`] each.
fn tx_recycler(pool: &Pool) -> Recycler {
    TX_CLASSES.iter().fold(Recycler::new(pool), |r, &class| {
        r.with_class(class, TX_SPARE_LIMIT)
    })
}

/// `52:54:00:12:34:10`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioNet {
    /// Opens the virtio-net function `bdf` (bound to vfio-pci) in a new VFIO container, makes a
    /// pool over the container's view with `cfg.pool`, and brings the device up (see
    /// [`VirtioNet::with_pool`]). Blocking; setup only.
    ///
    /// ```no_run
    /// use tidepool_virtio_net::{NetConfig, VirtioNet};
    /// let mut nic = VirtioNet::open("0000:00:10.0", NetConfig::default())?;
    /// nic.send_batch(&[&[0xffu8; 60][..]])?;
    /// let mut frames = Vec::new();
    /// nic.recv_batch(&mut frames, 32)?;
    /// # Ok::<(), tidepool_virtio_net::NetError>(())
    /// ```
    pub fn open(bdf: &str, cfg: NetConfig) -> Result<VirtioNet, NetError> {
        let (device, _view) = VfioDevice::open(bdf, u64::MAX).map_err(VirtioError::from)?;
        VirtioNet::with_device(std::sync::Arc::new(device), cfg)
    }

    /// Brings up `device` (any [`PciDevice`]: VFIO, or an emulated device in tests) with a new
    /// pool over its DMA view, made with `cfg.pool` (see [`VirtioNet::with_pool`]).
    pub fn with_device(
        device: std::sync::Arc<dyn PciDevice>,
        cfg: NetConfig,
    ) -> Result<VirtioNet, NetError> {
        // Identify the device before making a pool for it: a wrong BDF fails fast and cheaply.
        let transport = VirtioPci::open(device, VIRTIO_NET_TYPE, "net")?;
        let view: std::sync::Arc<dyn DeviceView> =
            transport.device().dma_view().map_err(VirtioError::from)?;
        let pool = Pool::new(view, cfg.pool.clone())?;
        VirtioNet::start(transport, pool, cfg)
    }

    /// Brings up `device` with rings and buffers from `pool` (which must share memory with
    /// this device's IOMMU domain): reset, negotiate (VERSION_1 and ACCESS_PLATFORM required;
    /// MAC and STATUS if offered; no checksum offload, no mergeable buffers, no EVENT_IDX),
    /// bus mastering, MSI-X (if `cfg.interrupts`), queues 0 (RX) and 1 (TX), DRIVER_OK, and a
    /// first RX refill. Blocking; setup only.
    pub fn with_pool(
        device: std::sync::Arc<dyn PciDevice>,
        pool: Pool,
        cfg: NetConfig,
    ) -> Result<VirtioNet, NetError> {
        let transport = VirtioPci::open(device, VIRTIO_NET_TYPE, "net")?;
        VirtioNet::start(transport, pool, cfg)
    }

    /// The common part of [`VirtioNet::open`] and [`VirtioNet::with_pool`].
    fn start(mut transport: VirtioPci, pool: Pool, cfg: NetConfig) -> Result<VirtioNet, NetError> {
        let domain = transport
            .device()
            .dma_view()
            .map_err(VirtioError::from)?
            .domain();
        if pool.domain() != domain {
            return Err(NetError::ForeignBuffer {
                buffer: pool.domain(),
                device: domain,
            });
        }
        transport.reset(cfg.reset_timeout)?;
        let required = features::VERSION_1 | features::ACCESS_PLATFORM;
        let accepted = transport.negotiate(required, F_MAC | F_STATUS, cfg.refuse_features)?;
        let setup = |t: &mut VirtioPci| -> Result<(SplitQueue, SplitQueue), NetError> {
            t.device().set_bus_master(true).map_err(VirtioError::from)?;
            if t.num_queues()? < 2 {
                return Err(VirtioError::Queue {
                    queue: TX_QUEUE,
                    problem: "the device has fewer than 2 queues".into(),
                }
                .into());
            }
            let (rx_vec, tx_vec) = if cfg.interrupts {
                t.enable_msix(2)?;
                (RX_VECTOR as u16, TX_VECTOR as u16)
            } else {
                (NO_VECTOR, NO_VECTOR)
            };
            let mut queues = Vec::new();
            for (q, vector) in [(RX_QUEUE, rx_vec), (TX_QUEUE, tx_vec)] {
                let max = t.max_queue_size(q)?;
                let size = cfg.queue_size.min(max);
                let size = if size.is_power_of_two() {
                    size
                } else {
                    size.checked_next_power_of_two().map_or(1, |p| p / 2)
                };
                let mut queue = SplitQueue::new(&pool, q, size, None)?;
                let (d, a, u) = queue.addresses();
                t.setup_queue(q, size, d, a, u, vector)?;
                queue.set_notifier(t.notifier(q)?);
                queue.set_interrupts(false);
                queues.push(queue);
            }
            let tx = queues.pop();
            let rx = queues.pop();
            match (rx, tx) {
                (Some(rx), Some(tx)) => Ok((rx, tx)),
                _ => Err(VirtioError::Queue {
                    queue: RX_QUEUE,
                    problem: "internal: queues not made".into(),
                }
                .into()),
            }
        };
        let (rx, tx) = match setup(&mut transport) {
            Ok(q) => q,
            Err(e) => {
                transport.fail();
                // Nothing was posted; the reset makes sure the device forgets the rings
                // before they return to the pool (if it fails, they are dropped anyway only
                // after DRIVER_OK was never set, so the device never used them).
                let _ = transport.reset(cfg.reset_timeout);
                transport.disable_msix();
                return Err(e);
            }
        };
        let mut mac = [0x02, 0, 0, 0, 0, 1];
        if accepted & F_MAC != 0 {
            transport.read_device_config(0, &mut mac)?;
        }
        let rx_target = usize::from(rx.size());
        let mut net = VirtioNet {
            irq: Vec::new(),
            rx: Some(rx),
            tx: Some(tx),
            transport,
            mac,
            features: accepted,
            stats: NetStats::default(),
            reset_timeout: cfg.reset_timeout,
            rx_target,
            tx_spare: tx_recycler(&pool),
            rx_spare: Recycler::new(&pool).with_class(RX_BUFFER, rx_target),
            pool,
        };
        net.transport.driver_ok()?;
        net.refill_rx()?;
        Ok(net)
    }

    /// The device's MAC address (from its configuration if it offers VIRTIO_NET_F_MAC,
    /// otherwise the locally administered 02:00:00:00:00:01).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Link state: true if the device reports link up, or does not report it at all.
    pub fn link_up(&self) -> Result<bool, NetError> {
        if self.features & F_STATUS == 0 {
            return Ok(true);
        }
        let mut s = [0u8; 2];
        self.transport.read_device_config(6, &mut s)?;
        Ok(u16::from_le_bytes(s) & 1 != 0)
    }

    /// The pool the driver takes buffers from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        let mut s = self.stats;
        s.notifications = self.rx_ref().map_or(0, |q| q.notifications())
            + self.tx_ref().map_or(0, |q| q.notifications());
        s
    }

    /// RX buffers posted now.
    pub fn rx_posted(&self) -> usize {
        self.rx_ref().map_or(0, |q| q.outstanding())
    }

    /// TX descriptors free right now (completions not yet reaped are not counted).
    pub fn tx_free_slots(&self) -> usize {
        self.tx_ref().map_or(0, |q| q.free_slots())
    }

    /// TX buffers queued and not yet completed.
    pub fn tx_in_flight(&self) -> usize {
        self.tx_ref().map_or(0, |q| q.outstanding())
    }

    /// Limits how many RX buffers [`VirtioNet::refill_rx`] keeps posted (default: the queue
    /// size). Lower it to leave pool space to others.
    pub fn set_rx_target(&mut self, buffers: usize) {
        self.rx_target = buffers;
    }

    fn rx_ref(&self) -> Option<&SplitQueue> {
        self.rx.as_ref()
    }

    fn tx_ref(&self) -> Option<&SplitQueue> {
        self.tx.as_ref()
    }

    /// The RX queue; absent only during drop.
    fn rx_mut(&mut self) -> Result<&mut SplitQueue, NetError> {
        self.rx
            .as_mut()
            .ok_or(NetError::Ring(RingError::Broken(RX_QUEUE)))
    }

    /// The TX queue; absent only during drop.
    fn tx_mut(&mut self) -> Result<&mut SplitQueue, NetError> {
        self.tx
            .as_mut()
            .ok_or(NetError::Ring(RingError::Broken(TX_QUEUE)))
    }

    /// Posts RX buffers from the pool's immediate path until the ring holds the target or the
    /// pool has nothing right now; one doorbell at most. Returns how many it posted. Never
    /// blocks.
    pub fn refill_rx(&mut self) -> Result<usize, NetError> {
        let target = self.rx_target;
        let Some(rx) = self.rx.as_mut() else {
            return Err(NetError::Ring(RingError::Broken(RX_QUEUE)));
        };
        let mut posted = 0;
        let mut failed = false;
        while rx.outstanding() < target && rx.free_slots() > 0 {
            let buf = match self.rx_spare.take_kept(RX_BUFFER) {
                // Recycled: only this device's bytes and zeros (module docs).
                Some(buf) => {
                    self.stats.rx_recycled += 1;
                    buf
                }
                None => match self.pool.try_alloc(RX_BUFFER) {
                    Ok(buf) => buf,
                    Err(PoolError::Exhausted { .. }) => {
                        failed = true;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            if rx.push(buf, RX_BUFFER as u32, true).is_err() {
                break;
            }
            posted += 1;
        }
        rx.publish();
        if failed {
            self.stats.rx_alloc_failures += 1;
        }
        Ok(posted)
    }

    /// Moves up to `max` received frames into `out` (appending) and refills the RX ring.
    /// Returns how many it appended. Never blocks.
    pub fn recv_batch(&mut self, out: &mut Vec<RxFrame>, max: usize) -> Result<usize, NetError> {
        let mut got = 0;
        let mut runts = 0;
        let mut bytes = 0u64;
        {
            let rx = self.rx_mut()?;
            while got < max {
                let Some(c) = rx.pop_used()? else { break };
                let len = c.len as usize;
                if len < NET_HDR_LEN {
                    runts += 1;
                    continue;
                }
                bytes += (len - NET_HDR_LEN) as u64;
                out.push(RxFrame {
                    buf: c.buf,
                    len: len - NET_HDR_LEN,
                });
                got += 1;
            }
        }
        self.stats.rx_frames += got as u64;
        self.stats.rx_bytes += bytes;
        self.stats.rx_runts += runts;
        if got > 0 || runts > 0 || self.rx_posted() < self.rx_target {
            self.refill_rx()?;
        }
        Ok(got)
    }

    /// Hands a received frame's buffer back to the driver, to be posted again by the next
    /// refill without a trip through the pool (no zeroing: module docs). Kept only if it is one
    /// of this driver's RX buffers (from this pool, RX-sized) and fewer than one ring's worth
    /// are kept; otherwise it simply returns to its pool.
    pub fn recycle_rx(&mut self, frame: RxFrame) {
        // Read-only while out: it holds only this device's bytes (module docs).
        self.rx_spare.give_back(frame.buf);
    }

    /// Returns every recycled RX buffer to the pool.
    pub fn release_rx_spares(&mut self) {
        self.rx_spare.release();
    }

    /// Takes back completed TX buffers (kept for reuse up to [`TX_SPARE_LIMIT`] per size
    /// class, the rest returned to the pool); returns how many completed.
    pub fn reap_tx(&mut self) -> Result<usize, NetError> {
        let Some(tx) = self.tx.as_mut() else {
            return Err(NetError::Ring(RingError::Broken(TX_QUEUE)));
        };
        let mut n = 0;
        while let Some(c) = tx.pop_used()? {
            // It held only a frame given to this device (module docs).
            self.tx_spare.give_back(c.buf);
            n += 1;
        }
        self.stats.tx_completed += n as u64;
        Ok(n)
    }

    /// Returns every spare TX buffer to the pool (e.g. to give memory back when idle).
    pub fn release_tx_spares(&mut self) {
        self.tx_spare.release();
    }

    /// Checks a frame length against the MTU.
    fn check_frame(len: usize) -> Result<(), NetError> {
        if len > MAX_FRAME {
            return Err(NetError::FrameTooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        if len < MIN_FRAME {
            return Err(NetError::FrameTooShort {
                len,
                min: MIN_FRAME,
            });
        }
        Ok(())
    }

    /// Queues as many of `frames` as the TX ring and the pool's immediate path allow right now
    /// (in order), copying each into a pool buffer behind a zeroed virtio-net header, and
    /// publishes them with one doorbell at most. Returns how many were queued (the rest: send
    /// again later). Every frame is checked first: one bad length fails the whole call and
    /// queues nothing. Never blocks.
    pub fn send_batch(&mut self, frames: &[&[u8]]) -> Result<usize, NetError> {
        for f in frames {
            Self::check_frame(f.len())?;
        }
        self.reap_tx()?;
        let Some(tx) = self.tx.as_mut() else {
            return Err(NetError::Ring(RingError::Broken(TX_QUEUE)));
        };
        let mut queued = 0;
        let mut bytes = 0u64;
        for f in frames {
            if tx.free_slots() == 0 {
                break;
            }
            // A recycled buffer's header is still the zeroed one (module docs); a fresh one is
            // zeroed by the pool: either way the header is already right.
            let mut buf = match self.tx_spare.take(NET_HDR_LEN + f.len()) {
                Ok(b) => b,
                Err(PoolError::Exhausted { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            buf.write_at(NET_HDR_LEN, f)?;
            if tx.push(buf, (NET_HDR_LEN + f.len()) as u32, false).is_err() {
                break;
            }
            queued += 1;
            bytes += f.len() as u64;
        }
        tx.publish();
        self.stats.tx_frames += queued as u64;
        self.stats.tx_bytes += bytes;
        Ok(queued)
    }

    /// A zeroed pool buffer for a frame of `len` bytes to fill in place and send with
    /// [`VirtioNet::send_buffers`] (no copy by the driver). Immediate path: fails with
    /// [`PoolError::Exhausted`] rather than wait.
    pub fn tx_buffer(&self, len: usize) -> Result<TxBuf, NetError> {
        Self::check_frame(len)?;
        let buf = self.pool.try_alloc(NET_HDR_LEN + len)?;
        Ok(TxBuf { buf, len })
    }

    /// A buffer for a frame of `len` bytes to fill in place, preferring a recycled TX buffer
    /// of the right size class (no pool call, no zeroing): its frame bytes are **unspecified**
    /// — an earlier frame this driver sent to this device, or zeros — so the caller must
    /// overwrite whatever it does not want sent. A generator sending frames of one size can
    /// thereby restamp a few header bytes instead of writing whole frames (as Linux pktgen's
    /// `clone_skb` does). The virtio header is the zeroed one (module docs). Falls back to
    /// [`VirtioNet::tx_buffer`].
    pub fn tx_buffer_reused(&mut self, len: usize) -> Result<TxBuf, NetError> {
        Self::check_frame(len)?;
        match self.tx_spare.take_kept(NET_HDR_LEN + len) {
            Some(buf) => Ok(TxBuf { buf, len }),
            None => self.tx_buffer(len),
        }
    }

    /// Queues buffers from the front of `bufs` while the TX ring has room, publishing them
    /// with one doorbell at most; the ones not queued stay in `bufs`. Returns how many were
    /// queued.
    /// A buffer of another DMA domain (another device's pool) is refused with
    /// [`NetError::ForeignBuffer`] and stays at the front of `bufs`; the ones before it are
    /// sent.
    pub fn send_buffers(&mut self, bufs: &mut VecDeque<TxBuf>) -> Result<usize, NetError> {
        self.reap_tx()?;
        let domain = self.pool.domain();
        let tx = self.tx_mut()?;
        let mut queued = 0;
        let mut bytes = 0u64;
        while tx.free_slots() > 0 {
            let Some(b) = bufs.pop_front() else { break };
            if b.buf.domain() != domain {
                let buffer = b.buf.domain();
                bufs.push_front(b);
                tx.publish();
                self.stats.tx_frames += queued as u64;
                self.stats.tx_bytes += bytes;
                return Err(NetError::ForeignBuffer {
                    buffer,
                    device: domain,
                });
            }
            let len = b.len;
            if let Err(buf) = tx.push(b.buf, (NET_HDR_LEN + len) as u32, false) {
                bufs.push_front(TxBuf { buf, len });
                break;
            }
            queued += 1;
            bytes += len as u64;
        }
        tx.publish();
        self.stats.tx_frames += queued as u64;
        self.stats.tx_bytes += bytes;
        Ok(queued)
    }

    /// The minimal polled TX loop, for comparison with the driver's real path: `ring` pool
    /// buffers are filled with `frame` once and re-posted as soon as the device completes them
    /// (no allocation, no copy, no per-frame checks beyond the ring validation), published
    /// `batch` at a time. Runs until `count` frames were completed or `until` passes. Returns
    /// the frames the device completed. Not a data path: a yardstick.
    pub fn baseline_tx_loop(
        &mut self,
        frame: &[u8],
        batch: usize,
        count: u64,
        until: std::time::Instant,
    ) -> Result<u64, NetError> {
        Self::check_frame(frame.len())?;
        self.reap_tx()?;
        let pool = self.pool.clone();
        let tx = self.tx_mut()?;
        let mut spare: Vec<DmaBuf> = Vec::new();
        for _ in 0..tx.free_slots() {
            let mut b = pool.try_alloc(NET_HDR_LEN + frame.len())?;
            b.write_at(NET_HDR_LEN, frame)?;
            spare.push(b);
        }
        let len = (NET_HDR_LEN + frame.len()) as u32;
        let mut completed = 0u64;
        let mut iterations = 0u32;
        while completed < count {
            iterations = iterations.wrapping_add(1);
            if iterations % 64 == 0 && std::time::Instant::now() >= until {
                break;
            }
            let mut n = 0;
            while n < batch {
                let Some(b) = spare.pop() else { break };
                if let Err(b) = tx.push(b, len, false) {
                    spare.push(b);
                    break;
                }
                n += 1;
            }
            tx.publish();
            while let Some(c) = tx.pop_used()? {
                spare.push(c.buf);
                completed += 1;
            }
        }
        // Let the ring drain so the caller starts from an empty TX queue.
        let drain_until = std::time::Instant::now() + Duration::from_secs(2);
        while tx.outstanding() > 0 && std::time::Instant::now() < drain_until {
            while let Some(c) = tx.pop_used()? {
                drop(c.buf);
                completed += 1;
            }
        }
        Ok(completed)
    }

    /// The minimal polled RX loop, for comparison with the driver's real path: every completed
    /// buffer is posted straight back (no allocation, no zeroing, nothing handed to a caller),
    /// one publication per poll that found frames. Runs until `until` (checked every 64 polls)
    /// and returns the frames received. Not a data path: a yardstick.
    pub fn baseline_rx_loop(&mut self, until: std::time::Instant) -> Result<u64, NetError> {
        self.refill_rx()?;
        let rx = self.rx_mut()?;
        let mut received = 0u64;
        let mut polls = 0u32;
        loop {
            polls = polls.wrapping_add(1);
            if polls % 64 == 0 && std::time::Instant::now() >= until {
                break;
            }
            let mut n = 0;
            while let Some(c) = rx.pop_used()? {
                // The slot just freed takes it back.
                if rx.push(c.buf, RX_BUFFER as u32, true).is_err() {
                    break;
                }
                n += 1;
            }
            if n > 0 {
                rx.publish();
                received += n;
            }
        }
        Ok(received)
    }

    /// Registers the MSI-X eventfds with tokio's reactor on first use.
    fn irq_fds(&mut self) -> Result<(), NetError> {
        if !self.irq.is_empty() {
            return Ok(());
        }
        let mut fds = Vec::new();
        for v in [RX_VECTOR, TX_VECTOR] {
            let fd = self
                .transport
                .msix_eventfd(v)
                .ok_or(NetError::NoInterrupts)?
                .as_raw_fd();
            fds.push(register_irq_fd(fd)?);
        }
        self.irq = fds;
        Ok(())
    }

    /// Sleeps until MSI-X vector `vector` fires, then drains its eventfd.
    async fn wait_irq(&self, vector: usize) -> Result<(), NetError> {
        let fd = self.irq.get(vector).ok_or(NetError::NoInterrupts)?;
        let mut guard = fd.readable().await.map_err(NetError::Wait)?;
        if let Some(e) = self.transport.msix_eventfd(vector) {
            // Non-blocking read: EAGAIN just means a spurious wakeup.
            let _ = e.read();
        }
        guard.clear_ready();
        Ok(())
    }

    /// Receives at least one frame (up to `max`) into `out`, sleeping on the RX interrupt
    /// while the ring is empty. Cancel-safe: frames are only taken off the ring by the
    /// synchronous [`VirtioNet::recv_batch`] inside.
    pub async fn recv_async(
        &mut self,
        out: &mut Vec<RxFrame>,
        max: usize,
    ) -> Result<usize, NetError> {
        self.irq_fds()?;
        loop {
            let n = self.recv_batch(out, max)?;
            if n > 0 {
                return Ok(n);
            }
            self.rx_mut()?.set_interrupts(true);
            if self.rx_mut()?.has_used() {
                self.rx_mut()?.set_interrupts(false);
                continue;
            }
            let waited = self.wait_irq(RX_VECTOR).await;
            self.rx_mut()?.set_interrupts(false);
            waited?;
        }
    }

    /// Queues at least one of `frames` (bounced), sleeping on the TX interrupt while the ring
    /// is full, or awaiting the pool if it is empty and nothing is in flight. Returns how many
    /// were queued.
    pub async fn send_async(&mut self, frames: &[&[u8]]) -> Result<usize, NetError> {
        self.irq_fds()?;
        if frames.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.send_batch(frames)?;
            if n > 0 {
                return Ok(n);
            }
            if self.tx_in_flight() == 0 {
                // The ring is empty, so the pool was the obstacle: wait for it (the awaitable
                // path), then queue the first frame from that buffer.
                let f = frames[0];
                let mut buf = self.pool.alloc(NET_HDR_LEN + f.len()).await?;
                buf.write_at(NET_HDR_LEN, f)?;
                let tx = self.tx_mut()?;
                if tx.push(buf, (NET_HDR_LEN + f.len()) as u32, false).is_ok() {
                    tx.publish();
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += f.len() as u64;
                    return Ok(1);
                }
                continue;
            }
            self.tx_mut()?.set_interrupts(true);
            if self.tx_mut()?.has_used() {
                self.tx_mut()?.set_interrupts(false);
                continue;
            }
            let waited = self.wait_irq(TX_VECTOR).await;
            self.tx_mut()?.set_interrupts(false);
            waited?;
        }
    }
}

impl Drop for VirtioNet {
    /// Resets the device, then lets the queues give their buffers back; leaks them if the
    /// reset fails (module docs).
    fn drop(&mut self) {
        self.irq.clear();
        let reset = self.transport.reset(self.reset_timeout);
        if reset.is_ok() {
            self.release_tx_spares();
            self.release_rx_spares();
        } else {
            // The device may still write them (the IOMMU mapping is live): never reuse.
            self.tx_spare.leak_kept();
            self.rx_spare.leak_kept();
        }
        self.transport.disable_msix();
        for q in [self.rx.take(), self.tx.take()].into_iter().flatten() {
            if reset.is_ok() {
                let mut q = q;
                drop(q.take_all_after_reset());
                drop(q);
            } else {
                q.leak_after_failed_reset();
            }
        }
    }
}

/// Checks that `len` bytes at `offset` lie inside a frame of `frame_len` bytes.
fn check_frame_range(offset: usize, len: usize, frame_len: usize) -> Result<(), PoolError> {
    match offset.checked_add(len) {
        Some(end) if end <= frame_len => Ok(()),
        _ => Err(PoolError::OutOfBounds {
            offset,
            len,
            capacity: frame_len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_length_limits() {
        assert!(VirtioNet::check_frame(MAX_FRAME).is_ok());
        assert!(matches!(
            VirtioNet::check_frame(MAX_FRAME + 1),
            Err(NetError::FrameTooLarge {
                len: 1515,
                max: 1514
            })
        ));
        assert!(matches!(
            VirtioNet::check_frame(13),
            Err(NetError::FrameTooShort { .. })
        ));
    }
}
