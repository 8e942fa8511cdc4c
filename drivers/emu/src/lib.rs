//! Emulated PCI devices for Tidepool's host tests: no VM, no hardware, faults on demand.
//!
//! - [`EmuIommu`]: an IOMMU domain implementing [`tidepool::share::DeviceView`]; IOVAs come
//!   from a deterministic allocator at a fixed base, so two domains alias (as two VFIO
//!   containers would) and cross-domain mistakes show up as corruption or IOMMU faults.
//! - [`pci::PciCore`]: config space, COMMAND (memory decode, bus mastering), an MSI-X
//!   capability delivering to eventfds, and the DMA helper.
//! - [`EmuNvme`]: an NVMe controller on its own thread behind [`tidepool::device::PciDevice`].
//!
//! Like hardware, the models read and write host memory only by DMA through their view:
//! every access checks bus mastering, translates through the IOMMU domain (an unmapped IOVA
//! is a counted fault) and copies with [`tidepool::copy`]; no reference is ever formed over
//! memory the driver may change. The models are independent implementations of the specs
//! (the NVMe one follows the structure of OpenVMM's emulated controller), not of our drivers.
//!
//! Faults ([`Faults`]): drop N completions; corrupt a completion ([`Corruption`]: bad CID,
//! duplicate CID, stale phase, SQ head out of range, wrong SQ ID); flood a CQ; CSTS.CFS; hold a
//! command (its DMA continues until bus mastering goes off); fail the next bus-master clear;
//! fail function resets; fail queue creation or deletion; delay completions. The IOMMU adds a
//! mapping limit and a one-shot share failure.

pub mod iommu;
pub mod nvme;
pub mod pci;
pub mod virtio_net;

pub use iommu::{EmuIommu, IommuFaults};
pub use nvme::{Corruption, EmuNvme, EmuNvmeConfig, EmuNvmeStats, Faults};
pub use virtio_net::{
    CapCorruption, EmuVirtioNet, EmuVirtioNetConfig, EmuVirtioNetStats, UsedCorruption, VnetFaults,
};
