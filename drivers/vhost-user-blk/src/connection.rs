//! Connecting to a vhost-user-blk backend and negotiating what both sides support.
//!
//! [`Connection::connect`] runs the handshake QEMU runs for a guest, in this order:
//! GET_FEATURES → GET_PROTOCOL_FEATURES → SET_PROTOCOL_FEATURES → GET_QUEUE_NUM →
//! GET_MAX_MEM_SLOTS → SET_OWNER → SET_FEATURES → GET_CONFIG (60 bytes: the size
//! `qemu-storage-daemon` serves). It refuses a backend that lacks what this frontend relies on
//! (VERSION_1, protocol features with REPLY_ACK, CONFIG and CONFIGURE_MEM_SLOTS) with
//! [`Error::MissingFeature`], naming the bit.
//!
//! All of it blocks (bounded by the timeout): call it from a blocking context
//! (`tokio::task::spawn_blocking` in async code).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::control::{Control, Reply};
use crate::protocol::{blk, features, protocol_features, BlkConfig, Reader, Request, Writer};
use crate::Error;

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Bound on every wait for a control reply (default 2 s).
    pub control_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            control_timeout: Duration::from_secs(2),
        }
    }
}

/// A negotiated connection to one vhost-user-blk backend. Shared (`Arc`) by the
/// [`crate::VhostUserView`] (memory regions) and the [`crate::BlockDevice`] (rings).
#[derive(Debug)]
pub struct Connection {
    pub(crate) control: Control,
    /// Virtio features both sides accepted.
    pub features: u64,
    /// Protocol features both sides accepted.
    pub protocol_features: u64,
    /// Queues the backend offers (GET_QUEUE_NUM).
    pub max_queues: u16,
    /// Memory slots the backend offers, SET_MEM_TABLE's region included (GET_MAX_MEM_SLOTS).
    pub max_mem_slots: u64,
    /// The device's config space, every field as the backend served it. A field whose feature
    /// bit was not negotiated means nothing and must be ignored (virtio 1.x §5.2.4): read
    /// such fields through [`Connection::size_max`], [`Connection::seg_max`],
    /// [`Connection::blk_size`], [`Connection::num_queues`],
    /// [`Connection::max_discard_sectors`] and [`Connection::max_write_zeroes_sectors`].
    pub config: BlkConfig,
}

impl Connection {
    /// The DMA address space of this connection: the addresses its views hand out mean
    /// something only to this backend. A pool over a [`crate::VhostUserView`] of this
    /// connection has this domain; [`crate::BlockDevice::start`] refuses any other pool.
    pub fn domain(&self) -> tidepool::share::DomainId {
        // The connection lives in an Arc that every view and device holds, so its address is
        // a stable identity while any of them lives.
        tidepool::share::DomainId((self as *const Connection).cast::<u8>() as usize as u64)
    }

    /// Connects to the backend listening on `socket` and negotiates. Blocks, each step bounded
    /// by `opts.control_timeout`.
    pub fn connect(socket: &Path, opts: &ConnectOptions) -> Result<Arc<Connection>, Error> {
        let control = Control::connect(socket, opts.control_timeout)?;
        let offered = read_u64(&control, Request::GetFeatures)?;
        for (bit, name) in [
            (features::VERSION_1, "VIRTIO_F_VERSION_1"),
            (
                features::PROTOCOL_FEATURES,
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ),
        ] {
            if offered & bit == 0 {
                return Err(Error::MissingFeature { name, offered });
            }
        }
        let proto_offered = read_u64(&control, Request::GetProtocolFeatures)?;
        for (bit, name) in [
            (protocol_features::MQ, "VHOST_USER_PROTOCOL_F_MQ"),
            (
                protocol_features::REPLY_ACK,
                "VHOST_USER_PROTOCOL_F_REPLY_ACK",
            ),
            (protocol_features::CONFIG, "VHOST_USER_PROTOCOL_F_CONFIG"),
            (
                protocol_features::CONFIGURE_MEM_SLOTS,
                "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS",
            ),
        ] {
            if proto_offered & bit == 0 {
                return Err(Error::MissingFeature {
                    name,
                    offered: proto_offered,
                });
            }
        }
        let protocol = proto_offered & protocol_features::REQUIRED;
        // No ack: REPLY_ACK is not in force until this message is processed.
        control.call(
            Request::SetProtocolFeatures,
            &Writer::default().u64(protocol).0,
            &[],
            Reply::None,
        )?;
        let max_queues = read_u64(&control, Request::GetQueueNum)?;
        let max_mem_slots = read_u64(&control, Request::GetMaxMemSlots)?;
        control.call(Request::SetOwner, &[], &[], Reply::Ack)?;
        let accepted = offered & features::WANTED;
        control.call(
            Request::SetFeatures,
            &Writer::default().u64(accepted).0,
            &[],
            Reply::Ack,
        )?;
        let config = read_config(&control)?;
        if config.capacity_sectors == 0 {
            return Err(Error::Protocol("the device reports a capacity of 0".into()));
        }
        Ok(Arc::new(Connection {
            control,
            features: accepted,
            protocol_features: protocol,
            max_queues: max_queues.clamp(1, u16::MAX as u64) as u16,
            max_mem_slots,
            config,
        }))
    }

    /// Device capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_sectors.saturating_mul(blk::SECTOR)
    }

    /// Whether the negotiated features include `bit` (see [`crate::protocol::features`]).
    pub fn has_feature(&self, bit: u64) -> bool {
        self.features & bit != 0
    }

    /// `value` if feature `bit` was negotiated, else `None` (the field means nothing).
    fn gated<T>(&self, bit: u64, value: T) -> Option<T> {
        self.has_feature(bit).then_some(value)
    }

    /// The largest data segment in bytes, if VIRTIO_BLK_F_SIZE_MAX was negotiated. May be 0:
    /// `qemu-storage-daemon` (7.2 and 10.0) offers the bit with `size_max` 0, meaning no
    /// limit.
    pub fn size_max(&self) -> Option<u32> {
        self.gated(features::BLK_SIZE_MAX, self.config.size_max)
    }

    /// The most data segments per request, if VIRTIO_BLK_F_SEG_MAX was negotiated.
    pub fn seg_max(&self) -> Option<u32> {
        self.gated(features::BLK_SEG_MAX, self.config.seg_max)
    }

    /// The logical block size in bytes, if VIRTIO_BLK_F_BLK_SIZE was negotiated (not
    /// validated here: [`crate::BlockDevice::start`] refuses a bad one).
    pub fn blk_size(&self) -> Option<u32> {
        self.gated(features::BLK_BLK_SIZE, self.config.blk_size)
    }

    /// The queues the device exposes, if VIRTIO_BLK_F_MQ was negotiated.
    pub fn num_queues(&self) -> Option<u16> {
        self.gated(features::BLK_MQ, self.config.num_queues)
    }

    /// The most sectors per DISCARD segment, if VIRTIO_BLK_F_DISCARD was negotiated.
    pub fn max_discard_sectors(&self) -> Option<u32> {
        self.gated(features::BLK_DISCARD, self.config.max_discard_sectors)
    }

    /// The most sectors per WRITE_ZEROES segment, if VIRTIO_BLK_F_WRITE_ZEROES was
    /// negotiated.
    pub fn max_write_zeroes_sectors(&self) -> Option<u32> {
        self.gated(
            features::BLK_WRITE_ZEROES,
            self.config.max_write_zeroes_sectors,
        )
    }

    /// Whether the connection is closed (by us, a failure, or the backend).
    pub fn is_closed(&self) -> bool {
        self.control.is_dead()
    }

    /// Closes the connection: the backend drops every ring and region. Idempotent.
    pub fn close(&self) {
        self.control.close("closed by the frontend");
    }

    /// A round trip that proves the backend is still alive and in step (GET_FEATURES). After
    /// a message that made `qemu-storage-daemon` panic, its ack still says 0; only the next
    /// exchange fails.
    pub fn probe(&self) -> Result<(), Error> {
        read_u64(&self.control, Request::GetFeatures).map(|_| ())
    }
}

/// Sends a request without payload whose reply is one `u64`.
fn read_u64(control: &Control, request: Request) -> Result<u64, Error> {
    let b = control.call(request, &[], &[], Reply::Payload(8))?;
    Reader::new(&b, request.name()).u64()
}

/// GET_CONFIG for exactly the 60 bytes the daemon serves (asking for more gets an empty error
/// reply, which [`Control::call`] reports as a protocol error).
fn read_config(control: &Control) -> Result<BlkConfig, Error> {
    let len = blk::CONFIG_LEN;
    let req = Writer::default()
        .u32(0)
        .u32(len as u32)
        .u32(0)
        .bytes(&[0u8; blk::CONFIG_LEN])
        .0;
    let b = control.call(Request::GetConfig, &req, &[], Reply::Payload(12 + len))?;
    let mut r = Reader::new(&b, "GET_CONFIG reply");
    let (offset, size) = (r.u32()?, r.u32()?);
    if offset != 0 || size as usize != len {
        return Err(Error::Protocol(format!(
            "GET_CONFIG reply describes offset {offset} size {size}, asked 0 / {len}"
        )));
    }
    BlkConfig::decode(&b[12..])
}
