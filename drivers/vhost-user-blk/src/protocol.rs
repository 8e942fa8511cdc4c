//! The vhost-user wire format (the subset a block frontend needs) and virtio-blk constants.
//!
//! Every message is a 12-byte header (`request`, `flags`, `size`, all little-endian `u32`)
//! followed by `size` bytes of payload; file descriptors travel as `SCM_RIGHTS` ancillary data
//! on the header's `sendmsg`. Replies carry the request code and the REPLY flag.
//!
//! Encoding is explicit byte-by-byte little-endian (no `repr(C)` casts), and decoding checks
//! every length, so a peer that sends garbage gets a typed [`crate::Error::Protocol`], never
//! a panic or an out-of-bounds read.

use crate::Error;

/// Protocol version carried in every header's flags.
pub const VERSION: u32 = 0x1;
/// Flags bit: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Flags bit: the frontend asks for an ack (REPLY_ACK protocol feature).
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Header size in bytes.
pub const HEADER_LEN: usize = 12;
/// Largest payload we accept in a reply (GET_CONFIG's is the largest: 12 + 60 bytes).
pub const MAX_REPLY_PAYLOAD: usize = 256;
/// `SET_VRING_KICK`/`CALL` flag: no file descriptor accompanies the message.
pub const VRING_NOFD_MASK: u64 = 0x100;

/// vhost-user front-end request codes used here.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Request {
    /// Virtio features offered by the backend.
    GetFeatures = 1,
    /// Virtio features the frontend accepts.
    SetFeatures = 2,
    /// Claims the backend for this connection.
    SetOwner = 3,
    /// The initial memory table (regions + memfds).
    SetMemTable = 5,
    /// Ring size.
    SetVringNum = 8,
    /// Ring addresses (in the regions' `userspace_addr` space).
    SetVringAddr = 9,
    /// First avail index the backend should process.
    SetVringBase = 10,
    /// Kick eventfd (frontend → backend).
    SetVringKick = 12,
    /// Call eventfd (backend → frontend).
    SetVringCall = 13,
    /// Protocol features offered.
    GetProtocolFeatures = 15,
    /// Protocol features accepted.
    SetProtocolFeatures = 16,
    /// Queues the backend supports.
    GetQueueNum = 17,
    /// Enables or disables one ring.
    SetVringEnable = 18,
    /// Reads device config space.
    GetConfig = 24,
    /// Memory slots the backend supports (SET_MEM_TABLE's region included).
    GetMaxMemSlots = 36,
    /// Adds one region (one memfd).
    AddMemReg = 37,
    /// Removes one region, matched exactly.
    RemMemReg = 38,
}

impl Request {
    /// The message's name as the vhost-user specification spells it, for errors.
    pub fn name(self) -> &'static str {
        match self {
            Request::GetFeatures => "GET_FEATURES",
            Request::SetFeatures => "SET_FEATURES",
            Request::SetOwner => "SET_OWNER",
            Request::SetMemTable => "SET_MEM_TABLE",
            Request::SetVringNum => "SET_VRING_NUM",
            Request::SetVringAddr => "SET_VRING_ADDR",
            Request::SetVringBase => "SET_VRING_BASE",
            Request::SetVringKick => "SET_VRING_KICK",
            Request::SetVringCall => "SET_VRING_CALL",
            Request::GetProtocolFeatures => "GET_PROTOCOL_FEATURES",
            Request::SetProtocolFeatures => "SET_PROTOCOL_FEATURES",
            Request::GetQueueNum => "GET_QUEUE_NUM",
            Request::SetVringEnable => "SET_VRING_ENABLE",
            Request::GetConfig => "GET_CONFIG",
            Request::GetMaxMemSlots => "GET_MAX_MEM_SLOTS",
            Request::AddMemReg => "ADD_MEM_REG",
            Request::RemMemReg => "REM_MEM_REG",
        }
    }

    /// Every request code this module knows, for [`Request::from_code`].
    pub const ALL: [Request; 17] = [
        Request::GetFeatures,
        Request::SetFeatures,
        Request::SetOwner,
        Request::SetMemTable,
        Request::SetVringNum,
        Request::SetVringAddr,
        Request::SetVringBase,
        Request::SetVringKick,
        Request::SetVringCall,
        Request::GetProtocolFeatures,
        Request::SetProtocolFeatures,
        Request::GetQueueNum,
        Request::SetVringEnable,
        Request::GetConfig,
        Request::GetMaxMemSlots,
        Request::AddMemReg,
        Request::RemMemReg,
    ];

    /// The request a header's code names, if it is one of these (what a backend, or a test
    /// playing one, decodes).
    pub fn from_code(code: u32) -> Option<Request> {
        Request::ALL.into_iter().find(|r| *r as u32 == code)
    }
}

/// Virtio feature bits (device-independent and virtio-blk).
pub mod features {
    /// virtio-blk: `size_max` in config is valid.
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    /// virtio-blk: `seg_max` in config is valid.
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    /// virtio-blk: read-only device.
    pub const BLK_RO: u64 = 1 << 5;
    /// virtio-blk: `blk_size` in config is valid.
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    /// virtio-blk: FLUSH command.
    pub const BLK_FLUSH: u64 = 1 << 9;
    /// virtio-blk: several queues.
    pub const BLK_MQ: u64 = 1 << 12;
    /// virtio-blk: DISCARD command.
    pub const BLK_DISCARD: u64 = 1 << 13;
    /// virtio-blk: WRITE_ZEROES command.
    pub const BLK_WRITE_ZEROES: u64 = 1 << 14;
    /// vhost-user: protocol features may be negotiated.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// Modern (1.0) virtio.
    pub const VERSION_1: u64 = 1 << 32;
    /// Everything this frontend can use; the rest (EVENT_IDX, INDIRECT_DESC, packed ring,
    /// ACCESS_PLATFORM...) is declined.
    pub const WANTED: u64 = BLK_SIZE_MAX
        | BLK_SEG_MAX
        | BLK_RO
        | BLK_BLK_SIZE
        | BLK_FLUSH
        | BLK_MQ
        | BLK_DISCARD
        | BLK_WRITE_ZEROES
        | PROTOCOL_FEATURES
        | VERSION_1;
}

/// vhost-user protocol feature bits.
pub mod protocol_features {
    /// GET_QUEUE_NUM.
    pub const MQ: u64 = 1 << 0;
    /// NEED_REPLY acks.
    pub const REPLY_ACK: u64 = 1 << 3;
    /// GET_CONFIG / SET_CONFIG.
    pub const CONFIG: u64 = 1 << 9;
    /// GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG.
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
    /// All of the above: this frontend needs every one.
    pub const REQUIRED: u64 = MQ | REPLY_ACK | CONFIG | CONFIGURE_MEM_SLOTS;
}

/// virtio-blk request types and status codes.
pub mod blk {
    /// Read.
    pub const T_IN: u32 = 0;
    /// Write.
    pub const T_OUT: u32 = 1;
    /// Flush the write cache.
    pub const T_FLUSH: u32 = 4;
    /// Discard sectors.
    pub const T_DISCARD: u32 = 11;
    /// Write zeroes.
    pub const T_WRITE_ZEROES: u32 = 13;
    /// Status: success.
    pub const S_OK: u8 = 0;
    /// Status: I/O error.
    pub const S_IOERR: u8 = 1;
    /// Status: unsupported request.
    pub const S_UNSUPP: u8 = 2;
    /// Sector size of the virtio-blk protocol, whatever the device's block size.
    pub const SECTOR: u64 = 512;
    /// `virtio_blk_discard_write_zeroes.flags`: unmap while zeroing.
    pub const WZ_UNMAP: u32 = 1;
    /// The config-space size `qemu-storage-daemon` serves (asking for more fails).
    pub const CONFIG_LEN: usize = 60;
}

/// Appends little-endian integers to a message under construction.
#[derive(Default, Debug)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// Appends a `u32`.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a `u64`.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads little-endian integers from a received payload, failing (not panicking) when short.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `bytes`, naming `what` in errors.
    pub fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.bytes.len() < n {
            return Err(Error::Protocol(format!(
                "{}: payload too short ({} bytes left, {n} needed)",
                self.what,
                self.bytes.len()
            )));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    /// Reads a `u16`.
    pub fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    /// Reads a `u32`.
    pub fn u32(&mut self) -> Result<u32, Error> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    /// Reads a `u64`.
    pub fn u64(&mut self) -> Result<u64, Error> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize) -> Result<(), Error> {
        self.take(n).map(|_| ())
    }
}

/// A 12-byte message header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Version and REPLY / NEED_REPLY bits.
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.request.to_le_bytes());
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&self.size.to_le_bytes());
        h
    }

    /// Decodes a header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: w(0),
            flags: w(4),
            size: w(8),
        }
    }
}

/// One memory region as vhost-user describes it: `guest_phys_addr` is what descriptors hold,
/// `userspace_addr` what ring addresses (SET_VRING_ADDR) hold. Both are chosen by us.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// Start in the descriptor address space.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub memory_size: u64,
    /// Start in the ring address space.
    pub userspace_addr: u64,
    /// Offset of the region in its memfd.
    pub mmap_offset: u64,
}

impl MemRegion {
    /// Appends the region's 32 bytes.
    pub fn encode(&self, w: Writer) -> Writer {
        w.u64(self.guest_phys_addr)
            .u64(self.memory_size)
            .u64(self.userspace_addr)
            .u64(self.mmap_offset)
    }

    /// Reads a region's 32 bytes (the backend's side of [`MemRegion::encode`]).
    pub fn decode(r: &mut Reader<'_>) -> Result<MemRegion, Error> {
        Ok(MemRegion {
            guest_phys_addr: r.u64()?,
            memory_size: r.u64()?,
            userspace_addr: r.u64()?,
            mmap_offset: r.u64()?,
        })
    }
}

/// virtio-blk config space (the 60 bytes `qemu-storage-daemon` serves), decoded.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Largest single segment (descriptor) in bytes; 0 = no limit given.
    pub size_max: u32,
    /// Most data segments per request; 0 = no limit given.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// Queues the device exposes.
    pub num_queues: u16,
    /// Most sectors per DISCARD segment.
    pub max_discard_sectors: u32,
    /// Most sectors per WRITE_ZEROES segment.
    pub max_write_zeroes_sectors: u32,
}

impl BlkConfig {
    /// Decodes the config space; `b` must be [`blk::CONFIG_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<BlkConfig, Error> {
        if b.len() < blk::CONFIG_LEN {
            return Err(Error::Protocol(format!(
                "GET_CONFIG returned {} bytes, {} expected",
                b.len(),
                blk::CONFIG_LEN
            )));
        }
        let mut r = Reader::new(b, "virtio_blk_config");
        let capacity_sectors = r.u64()?;
        let size_max = r.u32()?;
        let seg_max = r.u32()?;
        r.skip(4)?; // geometry
        let blk_size = r.u32()?;
        r.skip(1 + 1 + 2 + 4 + 1 + 1)?; // topology, wce, unused
        let num_queues = r.u16()?;
        let max_discard_sectors = r.u32()?;
        r.skip(8)?; // max_discard_seg, discard_sector_alignment
        let max_write_zeroes_sectors = r.u32()?;
        Ok(BlkConfig {
            capacity_sectors,
            size_max,
            seg_max,
            blk_size,
            num_queues,
            max_discard_sectors,
            max_write_zeroes_sectors,
        })
    }

    /// The 60 config-space bytes holding these fields (zero elsewhere): what a backend serves
    /// for GET_CONFIG. The inverse of [`BlkConfig::decode`].
    pub fn encode(&self) -> [u8; blk::CONFIG_LEN] {
        let mut b = [0u8; blk::CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            request: Request::GetConfig as u32,
            flags: VERSION | FLAG_NEED_REPLY,
            size: 72,
        };
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn short_payloads_are_errors() {
        let mut r = Reader::new(&[1, 2, 3], "test");
        assert!(matches!(r.u32(), Err(Error::Protocol(_))));
        assert!(BlkConfig::decode(&[0u8; 59]).is_err());
    }

    #[test]
    fn config_decodes_qemu_layout() {
        let mut b = [0u8; 60];
        b[0..8].copy_from_slice(&131072u64.to_le_bytes());
        b[12..16].copy_from_slice(&126u32.to_le_bytes());
        b[20..24].copy_from_slice(&512u32.to_le_bytes());
        b[34..36].copy_from_slice(&2u16.to_le_bytes());
        b[36..40].copy_from_slice(&32768u32.to_le_bytes());
        b[48..52].copy_from_slice(&32768u32.to_le_bytes());
        let c = BlkConfig::decode(&b).unwrap();
        assert_eq!(c.capacity_sectors, 131072);
        assert_eq!(c.seg_max, 126);
        assert_eq!(c.blk_size, 512);
        assert_eq!(c.num_queues, 2);
        assert_eq!(c.max_discard_sectors, 32768);
        assert_eq!(c.max_write_zeroes_sectors, 32768);
        assert_eq!(c.encode(), b, "encode is decode's inverse");
    }

    #[test]
    fn request_codes_round_trip() {
        for r in Request::ALL {
            assert_eq!(Request::from_code(r as u32), Some(r), "{}", r.name());
        }
        assert_eq!(Request::from_code(0), None);
        assert_eq!(
            Request::from_code(4),
            None,
            "SET_OWNER's neighbour RESET_OWNER is not ours"
        );
    }

    #[test]
    fn mem_region_round_trips() {
        let m = MemRegion {
            guest_phys_addr: 0x1_0000_0000,
            memory_size: 2 << 20,
            userspace_addr: 0x1001_0000_0000,
            mmap_offset: 4096,
        };
        let b = m.encode(Writer::default()).0;
        assert_eq!(b.len(), 32);
        assert_eq!(MemRegion::decode(&mut Reader::new(&b, "test")).unwrap(), m);
        assert!(MemRegion::decode(&mut Reader::new(&b[..31], "test")).is_err());
    }
}
