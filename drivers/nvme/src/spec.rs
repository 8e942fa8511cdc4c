//! NVMe wire formats (NVM Express Base Specification 1.4): the 64-byte submission entry, the
//! 16-byte completion entry, opcodes, status codes, and the Identify and log-page structures
//! this driver reads.
//!
//! Everything here is plain data: commands are built in ordinary memory and copied into the
//! submission ring by [`crate::queue`]; Identify pages and log pages are copied out of pool
//! buffers into byte arrays before they are parsed, so a parser never looks at memory a device
//! can still change. Parsers take `&[u8]` of the documented length and never panic on any
//! content.

/// Size of a submission queue entry (2^6 = 64 B, `CC.IOSQES = 6`).
pub const SQ_ENTRY_BYTES: usize = 64;
/// Size of a completion queue entry (2^4 = 16 B, `CC.IOCQES = 4`).
pub const CQ_ENTRY_BYTES: usize = 16;
/// The memory page size this driver programs (`CC.MPS = 0`: 4 KiB). PRPs are in these pages.
pub const PAGE_BYTES: usize = 4096;
/// The size of an Identify data structure and of the pages we read logs into.
pub const IDENTIFY_BYTES: usize = 4096;
/// The PSDT field (PRP or SGL for Data Transfer) in [`Command::flags`]: CDW0 bits 15:14.
pub const PSDT_MASK: u8 = 0xc0;
/// PSDT = 00b: PRP1/PRP2 describe the data (the only choice for admin commands over PCIe).
pub const PSDT_PRP: u8 = 0x00;
/// PSDT = 01b: SGL1 (bytes 24..40) describes the data; MPTR, if used, is a contiguous buffer.
pub const PSDT_SGL_MPTR_CONTIGUOUS: u8 = 0x40;

/// Admin command opcodes (Base spec 1.4, figure 139).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminOpcode {
    /// Delete I/O Submission Queue.
    DeleteIoSq = 0x00,
    /// Create I/O Submission Queue.
    CreateIoSq = 0x01,
    /// Get Log Page.
    GetLogPage = 0x02,
    /// Delete I/O Completion Queue.
    DeleteIoCq = 0x04,
    /// Create I/O Completion Queue.
    CreateIoCq = 0x05,
    /// Identify.
    Identify = 0x06,
    /// Abort.
    Abort = 0x08,
    /// Set Features.
    SetFeatures = 0x09,
    /// Get Features.
    GetFeatures = 0x0a,
    /// Doorbell Buffer Config (shadow doorbells).
    DoorbellBufferConfig = 0x7c,
}

/// NVM command set I/O opcodes (NVM command set, figure 346 of Base 1.4).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum IoOpcode {
    /// Flush the volatile write cache.
    Flush = 0x00,
    /// Write.
    Write = 0x01,
    /// Read.
    Read = 0x02,
    /// Write Zeroes.
    WriteZeroes = 0x08,
    /// Dataset Management (deallocate = TRIM).
    DatasetManagement = 0x09,
}

/// Identify CNS values used here.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Cns {
    /// Identify Namespace (for `nsid`).
    Namespace = 0x00,
    /// Identify Controller.
    Controller = 0x01,
    /// Active namespace ID list (IDs greater than `nsid`).
    ActiveNamespaces = 0x02,
}

/// Feature identifiers used here.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FeatureId {
    /// Number of Queues.
    NumberOfQueues = 0x07,
}

/// Log page identifiers used here.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LogPageId {
    /// Error Information (64 B per entry).
    ErrorInformation = 0x01,
    /// SMART / Health Information (512 B).
    SmartHealth = 0x02,
}

/// A submission queue entry: 16 dwords, little-endian on the wire.
///
/// Built in CPU memory with the constructors below and copied into the ring as bytes
/// ([`Command::to_bytes`]); the driver fills in the command identifier ([`Command::cid`]) when it
/// takes a slot.
///
/// ```
/// use tidepool_nvme::spec::{Command, IoOpcode};
/// let mut c = Command::io(IoOpcode::Read, 1);
/// c.cdw10 = 42; // starting LBA, low dword
/// c.cid = 7;
/// let b = c.to_bytes();
/// assert_eq!(b[0], 0x02);
/// assert_eq!(u16::from_le_bytes([b[2], b[3]]), 7);
/// ```
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode (CDW0 bits 7:0).
    pub opcode: u8,
    /// Fused operation and PSDT (CDW0 bits 15:8): 0 for PRPs, [`PSDT_SGL_MPTR_CONTIGUOUS`]
    /// once [`Command::set_sgl1`] put an SGL descriptor in the data pointer. Never fused.
    pub flags: u8,
    /// Command identifier (CDW0 bits 31:16): unique among this SQ's outstanding commands.
    pub cid: u16,
    /// Namespace ID.
    pub nsid: u32,
    /// CDW2, CDW3 (command specific).
    pub cdw2: u32,
    /// See `cdw2`.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1: the first data page (may have an offset). With PSDT = SGL, the first
    /// eight bytes of SGL1 (the descriptor's address).
    pub prp1: u64,
    /// PRP entry 2: the second page, or the PRP list's address. With PSDT = SGL, the last
    /// eight bytes of SGL1 (length, and the SGL identifier in the top byte).
    pub prp2: u64,
    /// Command dwords 10-15.
    pub cdw10: u32,
    /// See `cdw10`.
    pub cdw11: u32,
    /// See `cdw10`.
    pub cdw12: u32,
    /// See `cdw10`.
    pub cdw13: u32,
    /// See `cdw10`.
    pub cdw14: u32,
    /// See `cdw10`.
    pub cdw15: u32,
}

impl Command {
    /// An admin command with `opcode`, everything else zero.
    pub fn admin(opcode: AdminOpcode) -> Command {
        Command {
            opcode: opcode as u8,
            ..Command::default()
        }
    }

    /// An I/O command with `opcode` for namespace `nsid`, everything else zero.
    #[inline]
    pub fn io(opcode: IoOpcode, nsid: u32) -> Command {
        Command {
            opcode: opcode as u8,
            nsid,
            ..Command::default()
        }
    }

    /// Identify with `cns` for `nsid` (0 for the controller); data goes to `prp1` (one 4 KiB
    /// page, which must be page aligned).
    pub fn identify(cns: Cns, nsid: u32, prp1: u64) -> Command {
        Command {
            nsid,
            prp1,
            cdw10: cns as u32,
            ..Command::admin(AdminOpcode::Identify)
        }
    }

    /// Get Log Page `lid` for `nsid` (0xffff_ffff = controller-wide), `bytes` long (a multiple
    /// of 4, at most one page here), into `prp1`.
    pub fn get_log_page(lid: LogPageId, nsid: u32, bytes: usize, prp1: u64) -> Command {
        let dwords = (bytes / 4).max(1) as u32 - 1; // 0's based
        Command {
            nsid,
            prp1,
            cdw10: (lid as u32) | ((dwords & 0xffff) << 16),
            cdw11: dwords >> 16,
            ..Command::admin(AdminOpcode::GetLogPage)
        }
    }

    /// Set Features Number of Queues: ask for `sq` submission and `cq` completion queues
    /// (1-based counts; the wire format is 0's based).
    pub fn set_number_of_queues(sq: u16, cq: u16) -> Command {
        Command {
            cdw10: FeatureId::NumberOfQueues as u32,
            cdw11: u32::from(sq.saturating_sub(1)) | (u32::from(cq.saturating_sub(1)) << 16),
            ..Command::admin(AdminOpcode::SetFeatures)
        }
    }

    /// Create I/O Completion Queue `qid` of `entries` at `addr` (physically contiguous),
    /// interrupts on MSI-X `vector` if `interrupts`.
    pub fn create_io_cq(
        qid: u16,
        entries: u16,
        addr: u64,
        vector: u16,
        interrupts: bool,
    ) -> Command {
        Command {
            prp1: addr,
            cdw10: u32::from(qid) | (u32::from(entries - 1) << 16),
            // PC (physically contiguous) = bit 0, IEN = bit 1, IV = bits 31:16.
            cdw11: 1 | (u32::from(interrupts) << 1) | (u32::from(vector) << 16),
            ..Command::admin(AdminOpcode::CreateIoCq)
        }
    }

    /// Create I/O Submission Queue `qid` of `entries` at `addr`, completing to `cqid`.
    pub fn create_io_sq(qid: u16, entries: u16, addr: u64, cqid: u16) -> Command {
        Command {
            prp1: addr,
            cdw10: u32::from(qid) | (u32::from(entries - 1) << 16),
            // PC = bit 0, QPRIO = 0 (urgent/ignored without WRR), CQID = bits 31:16.
            cdw11: 1 | (u32::from(cqid) << 16),
            ..Command::admin(AdminOpcode::CreateIoSq)
        }
    }

    /// Delete I/O Submission Queue `qid`.
    pub fn delete_io_sq(qid: u16) -> Command {
        Command {
            cdw10: u32::from(qid),
            ..Command::admin(AdminOpcode::DeleteIoSq)
        }
    }

    /// Delete I/O Completion Queue `qid`.
    pub fn delete_io_cq(qid: u16) -> Command {
        Command {
            cdw10: u32::from(qid),
            ..Command::admin(AdminOpcode::DeleteIoCq)
        }
    }

    /// Read or Write of `blocks` logical blocks (≥ 1) at `lba` (data pointer set separately).
    #[inline]
    pub fn read_write(opcode: IoOpcode, nsid: u32, lba: u64, blocks: u32) -> Command {
        Command {
            cdw10: lba as u32,
            cdw11: (lba >> 32) as u32,
            cdw12: (blocks - 1) & 0xffff, // NLB is 0's based, 16 bits
            ..Command::io(opcode, nsid)
        }
    }

    /// Write Zeroes of `blocks` (≥ 1) at `lba`.
    pub fn write_zeroes(nsid: u32, lba: u64, blocks: u32) -> Command {
        Command::read_write(IoOpcode::WriteZeroes, nsid, lba, blocks)
    }

    /// Dataset Management with the Deallocate attribute over `ranges` range entries (1-256)
    /// held at `prp1` (16 B each: context attributes, length in blocks, starting LBA).
    pub fn deallocate(nsid: u32, ranges: u32, prp1: u64) -> Command {
        Command {
            prp1,
            cdw10: ranges - 1,
            cdw11: 1 << 2, // AD: attribute deallocate
            ..Command::io(IoOpcode::DatasetManagement, nsid)
        }
    }

    /// Describes the command's data with the SGL descriptor `sgl1` instead of PRPs: stores it
    /// in the data pointer (bytes 24..40) and sets PSDT = 01b (SGL, metadata pointer
    /// contiguous) in CDW0 bits 15:14. Only for NVM I/O commands: over PCIe, admin commands
    /// must use PRPs.
    ///
    /// ```
    /// use tidepool_nvme::sgl::Descriptor;
    /// use tidepool_nvme::spec::{Command, IoOpcode};
    /// let mut c = Command::read_write(IoOpcode::Read, 1, 0, 8);
    /// c.set_sgl1(Descriptor::data_block(0x1_0003, 4096));
    /// let b = c.to_bytes();
    /// assert_eq!(b[1] >> 6, 0b01); // PSDT: SGL
    /// assert_eq!(&b[24..32], &0x1_0003u64.to_le_bytes());
    /// assert_eq!(&b[32..36], &4096u32.to_le_bytes());
    /// assert_eq!(b[39], 0x00); // Data Block, sub type Address
    /// ```
    #[inline]
    pub fn set_sgl1(&mut self, sgl1: crate::sgl::Descriptor) {
        let [address, rest] = sgl1.to_words();
        self.prp1 = address;
        self.prp2 = rest;
        self.flags = (self.flags & !PSDT_MASK) | PSDT_SGL_MPTR_CONTIGUOUS;
    }

    /// The 64 wire bytes as eight little-endian 64-bit words (word `i` = bytes `8i..8i+8`),
    /// what the queue stores into the ring.
    #[inline]
    pub fn to_words(&self) -> [u64; 8] {
        let dw = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
        let cdw0 =
            u32::from(self.opcode) | (u32::from(self.flags) << 8) | (u32::from(self.cid) << 16);
        [
            dw(cdw0, self.nsid),
            dw(self.cdw2, self.cdw3),
            self.mptr,
            self.prp1,
            self.prp2,
            dw(self.cdw10, self.cdw11),
            dw(self.cdw12, self.cdw13),
            dw(self.cdw14, self.cdw15),
        ]
    }

    /// Doorbell Buffer Config: shadow doorbells at `doorbells` (PRP1), event indexes at
    /// `event_indexes` (PRP2), each one page-aligned 4 KiB page.
    pub fn doorbell_buffer_config(doorbells: u64, event_indexes: u64) -> Command {
        Command {
            prp1: doorbells,
            prp2: event_indexes,
            ..Command::admin(AdminOpcode::DoorbellBufferConfig)
        }
    }

    /// The 64 wire bytes.
    pub fn to_bytes(&self) -> [u8; SQ_ENTRY_BYTES] {
        let mut b = [0u8; SQ_ENTRY_BYTES];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[8..12].copy_from_slice(&self.cdw2.to_le_bytes());
        b[12..16].copy_from_slice(&self.cdw3.to_le_bytes());
        b[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        let tail = [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ];
        for (i, dw) in tail.iter().enumerate() {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&dw.to_le_bytes());
        }
        b
    }
}

/// One 16-byte Dataset Management range entry (deallocate `blocks` at `lba`).
pub fn dsm_range_bytes(lba: u64, blocks: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[4..8].copy_from_slice(&blocks.to_le_bytes());
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b
}

/// A completion status (the status field without the phase bit): Status Code Type, Status
/// Code, More, Do Not Retry.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

impl Status {
    /// Builds a status from the 16-bit field of a completion entry (dropping the phase bit).
    pub fn from_field(field: u16) -> Status {
        Status(field >> 1)
    }

    /// True for "successful completion" (SCT 0, SC 0).
    pub fn is_success(self) -> bool {
        self.code() == 0 && self.code_type() == 0
    }

    /// Status Code (8 bits).
    pub fn code(self) -> u8 {
        self.0 as u8
    }

    /// Status Code Type (3 bits): 0 generic, 1 command specific, 2 media/data integrity, 3 path.
    pub fn code_type(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Do Not Retry: the same command will fail again.
    pub fn do_not_retry(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// A short name for the common codes, for error messages.
    pub fn name(self) -> &'static str {
        match (self.code_type(), self.code()) {
            (0, 0x00) => "successful completion",
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x03) => "command ID conflict",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "command abort requested",
            (0, 0x0b) => "invalid namespace or format",
            (0, 0x0d) => "invalid SGL segment descriptor",
            (0, 0x0e) => "invalid number of SGL descriptors",
            (0, 0x0f) => "data SGL length invalid",
            (0, 0x10) => "metadata SGL length invalid",
            (0, 0x11) => "SGL descriptor type invalid",
            (0, 0x16) => "SGL offset invalid",
            (0, 0x13) => "invalid PRP offset",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (1, 0x00) => "completion queue invalid",
            (1, 0x01) => "invalid queue identifier",
            (1, 0x02) => "invalid queue size",
            (1, 0x08) => "invalid interrupt vector",
            (1, 0x09) => "invalid log page",
            (1, 0x0c) => "invalid queue deletion",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x86) => "access denied",
            _ => "unknown status",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (SCT {:#x}, SC {:#04x}{})",
            self.name(),
            self.code_type(),
            self.code(),
            if self.do_not_retry() {
                ", do not retry"
            } else {
                ""
            }
        )
    }
}

/// Reads a little-endian u16 at `at` of `b`, or 0 if out of range (parsers never panic).
fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

/// Reads a little-endian u32 at `at` of `b`, or 0 if out of range.
fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads a little-endian u64 at `at` of `b`, or 0 if out of range.
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// Reads a little-endian u128 at `at` of `b`, or 0 if out of range.
fn le128(b: &[u8], at: usize) -> u128 {
    u128::from(le64(b, at)) | (u128::from(le64(b, at + 8)) << 64)
}

/// An ASCII, space-padded Identify string, trimmed; non-printable bytes become `?`.
fn ascii(b: &[u8], range: std::ops::Range<usize>) -> String {
    let s: String = b
        .get(range)
        .unwrap_or(&[])
        .iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect();
    s.trim().to_string()
}

/// The parts of the Identify Controller data structure (CNS 1) this driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI vendor ID.
    pub vid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum Data Transfer Size as a power of two in units of CAP.MPSMIN pages; 0 = no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version (same encoding as the VS register), 0 if not reported.
    pub version: u32,
    /// Submission queue entry size: required (bits 3:0) and maximum (bits 7:4), powers of two.
    pub sqes: u8,
    /// Completion queue entry size, as `sqes`.
    pub cqes: u8,
    /// Number of namespaces (the highest valid NSID).
    pub nn: u32,
    /// Optional NVM Command Support (bit 2 Dataset Management, bit 3 Write Zeroes).
    pub oncs: u16,
    /// Volatile Write Cache present (bit 0).
    pub vwc: u8,
    /// Error Log Page Entries (0's based).
    pub elpe: u8,
    /// Optional Admin Command Support (bit 8: Doorbell Buffer Config).
    pub oacs: u16,
    /// SGL Support (bytes 536..540), decoded by [`IdentifyController::sgl_support`].
    pub sgls: u32,
}

impl IdentifyController {
    /// Parses an Identify Controller page (at least 4096 bytes expected; shorter input reads
    /// as zeros past its end).
    pub fn parse(b: &[u8]) -> IdentifyController {
        IdentifyController {
            vid: le16(b, 0),
            serial: ascii(b, 4..24),
            model: ascii(b, 24..64),
            firmware: ascii(b, 64..72),
            mdts: b.get(77).copied().unwrap_or(0),
            cntlid: le16(b, 78),
            version: le32(b, 80),
            elpe: b.get(262).copied().unwrap_or(0),
            oacs: le16(b, 256),
            sqes: b.get(512).copied().unwrap_or(0),
            cqes: b.get(513).copied().unwrap_or(0),
            nn: le32(b, 516),
            oncs: le16(b, 520),
            vwc: b.get(525).copied().unwrap_or(0),
            sgls: le32(b, 536),
        }
    }

    /// What the controller supports of SGLs (the SGLS field decoded).
    pub fn sgl_support(&self) -> crate::sgl::SglSupport {
        crate::sgl::SglSupport::from_sgls(self.sgls)
    }

    /// Does the controller support Dataset Management (deallocate)?
    pub fn supports_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    /// Does the controller support Doorbell Buffer Config (shadow doorbells)?
    pub fn supports_doorbell_buffer_config(&self) -> bool {
        self.oacs & (1 << 8) != 0
    }

    /// Does the controller support Write Zeroes?
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }

    /// The largest transfer in bytes, given the minimum memory page size (`CAP.MPSMIN`);
    /// `None` when the controller sets no limit.
    pub fn max_transfer_bytes(&self, min_page_bytes: usize) -> Option<usize> {
        if self.mdts == 0 {
            return None;
        }
        // Clamp absurd values so the shift cannot overflow (2^31 pages is beyond any buffer).
        min_page_bytes.checked_shl(u32::from(self.mdts.min(31)))
    }
}

/// One LBA format of a namespace.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata bytes per block.
    pub metadata_bytes: u16,
    /// log2 of the data block size (9 = 512 B, 12 = 4 KiB).
    pub data_shift: u8,
    /// Relative performance (0 best).
    pub relative_performance: u8,
}

/// The parts of the Identify Namespace data structure (CNS 0) this driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: u64,
    /// Namespace capacity in logical blocks.
    pub ncap: u64,
    /// Namespace utilization in logical blocks.
    pub nuse: u64,
    /// Index of the LBA format in use (FLBAS bits 3:0, plus bits 6:5 above 16 formats).
    pub format_index: u8,
    /// The supported LBA formats (NLBAF + 1 of them, at most 64).
    pub formats: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    /// Parses an Identify Namespace page.
    pub fn parse(b: &[u8]) -> IdentifyNamespace {
        let nlbaf = b.get(25).copied().unwrap_or(0).min(63) as usize;
        let flbas = b.get(26).copied().unwrap_or(0);
        let format_index = (flbas & 0xf) | ((flbas >> 1) & 0x30);
        let formats = (0..=nlbaf)
            .map(|i| {
                let at = 128 + 4 * i;
                let dw = le32(b, at);
                LbaFormat {
                    metadata_bytes: dw as u16,
                    data_shift: (dw >> 16) as u8,
                    relative_performance: ((dw >> 24) & 0x3) as u8,
                }
            })
            .collect();
        IdentifyNamespace {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            format_index,
            formats,
        }
    }

    /// The LBA format in use, if the index names one the page lists.
    pub fn format(&self) -> Option<LbaFormat> {
        self.formats.get(self.format_index as usize).copied()
    }

    /// Bytes per logical block, if the format is sane (512 B to 64 KiB, no metadata interleave
    /// is assumed).
    pub fn block_bytes(&self) -> Option<u32> {
        let shift = self.format()?.data_shift;
        (9..=16).contains(&shift).then(|| 1u32 << shift)
    }
}

/// A list of namespace IDs (Identify CNS 2): non-zero IDs in order, up to 1024.
pub fn parse_namespace_list(b: &[u8]) -> Vec<u32> {
    (0..1024)
        .map(|i| le32(b, 4 * i))
        .take_while(|&id| id != 0)
        .collect()
}

/// The SMART / Health Information log page (log 2), the fields worth printing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmartLog {
    /// Critical warning bits (0 = all fine).
    pub critical_warning: u8,
    /// Composite temperature in kelvin.
    pub temperature_kelvin: u16,
    /// Available spare, percent.
    pub available_spare: u8,
    /// Percentage used (endurance estimate).
    pub percent_used: u8,
    /// Data units (1000 × 512 B) read.
    pub data_units_read: u128,
    /// Data units written.
    pub data_units_written: u128,
    /// Read commands completed.
    pub host_reads: u128,
    /// Write commands completed.
    pub host_writes: u128,
    /// Power-on hours.
    pub power_on_hours: u128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and data integrity errors.
    pub media_errors: u128,
    /// Error information log entries over the controller's life.
    pub error_log_entries: u128,
}

impl SmartLog {
    /// Bytes of the page.
    pub const BYTES: usize = 512;

    /// Parses the page.
    pub fn parse(b: &[u8]) -> SmartLog {
        SmartLog {
            critical_warning: b.first().copied().unwrap_or(0),
            temperature_kelvin: le16(b, 1),
            available_spare: b.get(3).copied().unwrap_or(0),
            percent_used: b.get(5).copied().unwrap_or(0),
            data_units_read: le128(b, 32),
            data_units_written: le128(b, 48),
            host_reads: le128(b, 64),
            host_writes: le128(b, 80),
            power_on_hours: le128(b, 128),
            unsafe_shutdowns: le128(b, 144),
            media_errors: le128(b, 160),
            error_log_entries: le128(b, 176),
        }
    }
}

/// One Error Information log entry (log 1), 64 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorLogEntry {
    /// Error count (0 = empty entry).
    pub error_count: u64,
    /// Submission queue the failed command was on.
    pub sqid: u16,
    /// Its command ID.
    pub cid: u16,
    /// Its status (phase bit dropped).
    pub status: Status,
    /// First failing LBA.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
}

impl ErrorLogEntry {
    /// Bytes per entry.
    pub const BYTES: usize = 64;

    /// Parses every non-empty entry of an error log page.
    pub fn parse_all(b: &[u8]) -> Vec<ErrorLogEntry> {
        b.chunks_exact(Self::BYTES)
            .map(|e| ErrorLogEntry {
                error_count: le64(e, 0),
                sqid: le16(e, 8),
                cid: le16(e, 10),
                status: Status::from_field(le16(e, 12)),
                lba: le64(e, 16),
                nsid: le32(e, 24),
            })
            .filter(|e| e.error_count != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_layout_matches_the_spec_offsets() {
        let mut c = Command::read_write(IoOpcode::Write, 3, 0x1_2345_6789, 8);
        c.cid = 0xbeef;
        c.prp1 = 0x1000;
        c.prp2 = 0x2000;
        let b = c.to_bytes();
        assert_eq!(b[0], 0x01);
        assert_eq!(&b[2..4], &0xbeefu16.to_le_bytes());
        assert_eq!(&b[4..8], &3u32.to_le_bytes());
        assert_eq!(&b[24..32], &0x1000u64.to_le_bytes());
        assert_eq!(&b[32..40], &0x2000u64.to_le_bytes());
        assert_eq!(&b[40..44], &0x2345_6789u32.to_le_bytes()); // SLBA low
        assert_eq!(&b[44..48], &1u32.to_le_bytes()); // SLBA high
        assert_eq!(&b[48..52], &7u32.to_le_bytes()); // NLB 0's based
    }

    #[test]
    fn words_are_the_wire_bytes() {
        let mut c = Command::read_write(IoOpcode::Read, 7, 0xdead_beef_cafe, 3);
        c.cid = 0x1234;
        c.flags = 0x40;
        c.cdw2 = 1;
        c.cdw3 = 2;
        c.mptr = 0x55_0000;
        c.prp1 = 0x1000;
        c.prp2 = 0x9_2000;
        c.cdw13 = 13;
        c.cdw14 = 14;
        c.cdw15 = 15;
        let from_words: Vec<u8> = c.to_words().iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(from_words, c.to_bytes().to_vec());
        let d = Command::doorbell_buffer_config(0x1000, 0x2000);
        assert_eq!((d.opcode, d.prp1, d.prp2), (0x7c, 0x1000, 0x2000));
    }

    #[test]
    fn queue_creation_commands_encode_sizes_zero_based() {
        let cq = Command::create_io_cq(3, 1024, 0xa000, 5, true);
        assert_eq!(cq.cdw10, 3 | (1023 << 16));
        assert_eq!(cq.cdw11, 0b11 | (5 << 16));
        let sq = Command::create_io_sq(3, 1024, 0xb000, 3);
        assert_eq!(sq.cdw11, 1 | (3 << 16));
        let nq = Command::set_number_of_queues(4, 4);
        assert_eq!(nq.cdw11, 3 | (3 << 16));
        let log = Command::get_log_page(LogPageId::SmartHealth, 0xffff_ffff, 512, 0x1000);
        assert_eq!(log.cdw10, 2 | (127 << 16));
    }

    #[test]
    fn identify_controller_fields_are_read_at_their_offsets() {
        let mut p = vec![0u8; IDENTIFY_BYTES];
        p[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        p[4..24].copy_from_slice(b"SERIAL-1            ");
        p[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
        p[64..72].copy_from_slice(b"7.2.0   ");
        p[77] = 7;
        p[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
        p[512] = 0x66;
        p[513] = 0x44;
        p[516..520].copy_from_slice(&1u32.to_le_bytes());
        p[520] = 0b1100;
        p[536..540].copy_from_slice(&0x0001_0001u32.to_le_bytes());
        let id = IdentifyController::parse(&p);
        assert_eq!(id.sgls, 0x0001_0001);
        assert!(id.sgl_support().supported() && id.sgl_support().bit_bucket());
        assert_eq!(id.vid, 0x1b36);
        assert_eq!(id.serial, "SERIAL-1");
        assert_eq!(id.model, "QEMU NVMe Ctrl");
        assert_eq!(id.firmware, "7.2.0");
        assert_eq!(id.max_transfer_bytes(4096), Some(512 << 10));
        assert_eq!(id.version, 0x10400);
        assert_eq!(id.nn, 1);
        assert!(id.supports_dsm() && id.supports_write_zeroes());
    }

    #[test]
    fn identify_namespace_selects_the_lba_format_in_use() {
        let mut p = vec![0u8; IDENTIFY_BYTES];
        p[0..8].copy_from_slice(&(1u64 << 21).to_le_bytes());
        p[25] = 1; // two formats
        p[26] = 1; // using format 1
        p[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        p[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let ns = IdentifyNamespace::parse(&p);
        assert_eq!(ns.nsze, 1 << 21);
        assert_eq!(ns.formats.len(), 2);
        assert_eq!(ns.block_bytes(), Some(4096));
        let mut bad = p.clone();
        bad[26] = 5; // names a format that is not listed
        assert_eq!(IdentifyNamespace::parse(&bad).block_bytes(), None);
    }

    #[test]
    fn parsers_survive_short_and_garbage_input() {
        for len in [0usize, 1, 30, 100, 600] {
            let junk: Vec<u8> = (0..len).map(|i| (i * 151 + 7) as u8).collect();
            let _ = IdentifyController::parse(&junk);
            let _ = IdentifyNamespace::parse(&junk).block_bytes();
            let _ = SmartLog::parse(&junk);
            let _ = ErrorLogEntry::parse_all(&junk);
            let _ = parse_namespace_list(&junk);
        }
        let id = IdentifyController::parse(&[0xffu8; 4096]);
        assert_eq!(id.max_transfer_bytes(4096), Some(4096usize << 31));
    }

    #[test]
    fn status_decodes_type_code_and_dnr() {
        // Phase bit 1, SC 0x80 (LBA out of range), SCT 0, DNR.
        let field: u16 = 1 | (0x80 << 1) | (1 << 15);
        let s = Status::from_field(field);
        assert_eq!(s.code(), 0x80);
        assert_eq!(s.code_type(), 0);
        assert!(s.do_not_retry());
        assert!(!s.is_success());
        assert!(s.to_string().contains("LBA out of range"));
        assert!(Status::from_field(1).is_success());
    }

    #[test]
    fn namespace_list_stops_at_the_first_zero() {
        let mut p = vec![0u8; 4096];
        p[0..4].copy_from_slice(&1u32.to_le_bytes());
        p[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(parse_namespace_list(&p), vec![1, 2]);
    }
}
