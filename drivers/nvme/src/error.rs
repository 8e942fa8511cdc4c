//! The driver's error type: one enum, each variant saying what went wrong and what to do.

use std::time::Duration;

use tidepool::device::DeviceError;
use tidepool::pool::PoolError;
use tidepool::share::{DomainId, ShareError};

use crate::completion::CompletionError;
use crate::prp::PrpError;
use crate::sgl::SglError;
use crate::spec::Status;

/// Everything that can go wrong in the NVMe driver.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// Opening or driving the PCI function failed (not bound to vfio-pci, no such device, no
    /// IOMMU group, a register access, ...). The inner error says how to fix it.
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    /// Making memory device-visible failed.
    #[error("DMA view: {0}")]
    Share(#[from] ShareError),
    /// A buffer mapped in another IOMMU domain was given to this controller: the device would
    /// DMA to whatever this domain has at that address. Use a buffer of this controller's pool
    /// (or of a pool over the same container).
    #[error("buffer belongs to {buffer}, but this controller DMAs through {device}: use a buffer from the controller's pool or from a pool over its container")]
    ForeignBuffer {
        /// The buffer's domain.
        buffer: DomainId,
        /// The controller's domain.
        device: DomainId,
    },
    /// The DMA pool could not provide memory.
    #[error("DMA pool: {0}")]
    Pool(#[from] PoolError),
    /// The PCI function is not an NVMe controller.
    #[error("PCI device {bdf} has class code {class:#08x}, not an NVMe controller (0x010802): check the address with lspci -nn")]
    NotNvme {
        /// The PCI address.
        bdf: String,
        /// Its 24-bit class code.
        class: u32,
    },
    /// The controller lacks something this driver needs.
    #[error("controller unsupported: {0}")]
    Unsupported(String),
    /// CSTS.RDY did not follow CC.EN (or shutdown did not complete) in time.
    #[error("controller did not {what} within {after:?} (CAP.TO): it may be wedged; reset the PCI function or the machine")]
    ControllerTimeout {
        /// What was awaited ("become ready", "become disabled", "shut down").
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// CSTS.CFS is set: the controller failed.
    #[error("controller fatal status (CSTS.CFS = 1, CSTS = {csts:#x}): the controller was reset; recover it and resubmit")]
    ControllerFatal {
        /// CSTS as read.
        csts: u32,
    },
    /// The command completed with an error status.
    #[error("NVMe command (opcode {opcode:#04x}) failed: {status}")]
    Command {
        /// The opcode.
        opcode: u8,
        /// The status.
        status: Status,
    },
    /// A command was outstanding longer than the queue's timeout; the controller was reset.
    #[error("NVMe command (opcode {opcode:#04x}, CID {cid}) timed out after {after:?}; the controller was reset and all its outstanding commands failed")]
    CommandTimeout {
        /// The opcode.
        opcode: u8,
        /// The command ID.
        cid: u16,
        /// The timeout.
        after: Duration,
    },
    /// The command was failed because the controller was reset (after a timeout, a fatal
    /// status or a protocol violation, possibly on another queue).
    #[error("command aborted: the controller was reset ({reason}); recover the controller, create new queues and resubmit")]
    ControllerReset {
        /// Why the controller was reset.
        reason: String,
    },
    /// The controller could not be stopped: clearing PCI bus mastering failed and so did the
    /// function reset, so the device may still read and write memory it was given. That
    /// memory (this command's data, the queues' rings and lists) is quarantined: leaked, never
    /// handed back or reused. The controller is unusable from here on.
    #[error("DMA could not be stopped ({reason}); the device may still write its memory, which was quarantined (leaked, never reused), and the controller is unusable: reset the PCI function (or the machine) and open it again")]
    DmaQuarantined {
        /// Why the controller was being reset, and how stopping it failed.
        reason: String,
    },
    /// The device posted a completion that breaks the protocol (see the inner error); the
    /// controller was reset.
    #[error("bad completion entry: {0}")]
    BadCompletion(#[from] CompletionError),
    /// The submission queue has no free slot.
    #[error("queue {qid} is full ({depth} commands outstanding): poll for completions first")]
    QueueFull {
        /// Queue ID.
        qid: u16,
        /// Depth.
        depth: u16,
    },
    /// A queue deeper than the controller allows was asked for.
    #[error("queue depth {asked} is beyond the controller's maximum of {max} entries (CAP.MQES + 1, minus one slot kept empty)")]
    QueueDepth {
        /// Depth asked.
        asked: u32,
        /// The most this controller allows.
        max: u32,
    },
    /// No more I/O queues can be created.
    #[error("no I/O queue left: the controller granted {granted} and all are in use; drop a queue first")]
    NoQueues {
        /// Queues granted by Set Features.
        granted: u16,
    },
    /// An I/O beyond the namespace's end.
    #[error("LBA range {lba}..{end} is beyond namespace {nsid}'s {capacity} blocks")]
    LbaOutOfRange {
        /// Namespace.
        nsid: u32,
        /// First block.
        lba: u64,
        /// One past the last block.
        end: u64,
        /// Blocks in the namespace.
        capacity: u64,
    },
    /// A buffer whose length is not a whole number of blocks.
    #[error("buffer of {len} B is not a non-zero multiple of the {block} B block size")]
    NotBlockMultiple {
        /// Buffer length.
        len: usize,
        /// Block size.
        block: u32,
    },
    /// One command cannot move this much (the low-level submit does not split).
    #[error("{len} B exceeds the {max} B one command may move (MDTS, pool max_buffer); use the splitting read/write or smaller buffers")]
    TooLarge {
        /// Length asked.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The namespace ID is not an active namespace.
    #[error("namespace {0} does not exist or is inactive; see Controller::namespaces()")]
    NoSuchNamespace(u32),
    /// The data pointer could not be built. (Boxed, as is [`NvmeError::Sgl`]'s: they are
    /// the largest payloads and rare, and every completion carries a `Result<_, NvmeError>`,
    /// so a smaller error keeps each [`crate::Done`] within two cache lines and its moves
    /// inline.)
    #[error(transparent)]
    Prp(Box<PrpError>),
    /// An SGL could not be built, or SGLs were asked for and the controller has none.
    #[error(transparent)]
    Sgl(Box<SglError>),
    /// The queue was deleted or its controller reset.
    #[error("queue {qid} is no longer usable ({why}); create a new one")]
    QueueGone {
        /// Queue ID.
        qid: u16,
        /// Why.
        why: &'static str,
    },
    /// An operating-system call failed (eventfd, tokio registration).
    #[error("{what}: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl From<PrpError> for NvmeError {
    fn from(e: PrpError) -> Self {
        NvmeError::Prp(Box::new(e))
    }
}

impl From<SglError> for NvmeError {
    fn from(e: SglError) -> Self {
        NvmeError::Sgl(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every completion moves a `Result<u32, NvmeError>`; the two boxed payloads keep the
    /// error, and with it a [`crate::Done`] of word-sized user data, within two cache lines, so
    /// its moves stay inline vector copies rather than `memcpy` calls.
    #[test]
    fn a_completion_of_word_sized_user_data_fits_two_cache_lines() {
        assert!(std::mem::size_of::<NvmeError>() <= 64);
        assert!(std::mem::size_of::<crate::Done<u64>>() <= 128);
    }

    #[test]
    fn boxed_data_pointer_errors_still_convert_and_display() {
        let e: NvmeError = SglError::NeedsSgl { ranges: 2 }.into();
        assert!(matches!(&e, NvmeError::Sgl(b) if matches!(**b, SglError::NeedsSgl { ranges: 2 })));
        assert_eq!(e.to_string(), SglError::NeedsSgl { ranges: 2 }.to_string());
    }
}
