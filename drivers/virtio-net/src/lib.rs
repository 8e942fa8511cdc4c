//! # tidepool-virtio-net: a userspace virtio-net driver over VFIO on Tidepool memory
//!
//! The device is a virtio 1.x network function bound to `vfio-pci` behind an IOMMU. Its
//! descriptor tables, rings and every packet buffer come from one Tidepool
//! [`Pool`](tidepool::pool::Pool) whose chunks are IOMMU-mapped for the device's VFIO
//! container; nothing the device can reach is ordinary Rust memory.
//!
//! - [`virtio`]: the reusable part (a virtio-blk driver can share it): the modern PCI
//!   transport over VFIO and split virtqueues with an untrusting used-ring reader.
//! - [`net`]: [`VirtioNet`], the network driver: RX buffers posted from the pool's immediate
//!   path and handed to the caller without a copy ([`RxFrame`]), TX bounced or zero-copy
//!   ([`TxBuf`]), batched publication and doorbells, polling and tokio async modes.
//! - [`bench`]: traffic generation and measurement (pps, bandwidth, latency percentiles),
//!   shared by the `tpnet` tool and the VM benchmark.
//! - [`frame`]: sequenced, checksummed test frames and an ARP/ICMP echo responder, used by
//!   the `tpnet` tool and the VM tests.
//!
//! ## The device is untrusted
//! Every used-ring entry is validated (id in range and posted, length ≤ posted) before a
//! buffer is believed; a violation is a typed [`RingError`] and breaks the queue until reset.
//! No ring content can make the driver panic (property-tested over arbitrary used-ring bytes).
//! The driver refuses a device that does not translate its DMA through the IOMMU
//! (no VIRTIO_F_ACCESS_PLATFORM).

pub mod bench;
pub mod frame;
pub mod net;
pub mod virtio;

pub use net::{NetConfig, NetError, NetStats, RxFrame, TxBuf, VirtioNet};
pub use virtio::{RingError, VirtioError};
