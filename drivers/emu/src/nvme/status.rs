//! Completion status values (Base spec 1.4, 4.6.1): the completion's status field without the
//! phase bit — Status Code in bits 7:0, Status Code Type in bits 10:8, Do Not Retry in bit 14.

/// A status as posted (without the phase tag).
pub(crate) type Status = u16;

const fn generic(sc: u8, dnr: bool) -> Status {
    sc as u16 | ((dnr as u16) << 14)
}

const fn specific(sc: u8) -> Status {
    sc as u16 | (1 << 8) | (1 << 14)
}

pub(crate) const SUCCESS: Status = 0;
pub(crate) const INVALID_OPCODE: Status = generic(0x01, true);
pub(crate) const INVALID_FIELD: Status = generic(0x02, true);
pub(crate) const DATA_TRANSFER_ERROR: Status = generic(0x04, false);
pub(crate) const INTERNAL_ERROR: Status = generic(0x06, false);
pub(crate) const INVALID_NAMESPACE: Status = generic(0x0b, true);
pub(crate) const INVALID_SGL_SEGMENT: Status = generic(0x0d, true);
pub(crate) const INVALID_SGL_COUNT: Status = generic(0x0e, true);
pub(crate) const DATA_SGL_LENGTH_INVALID: Status = generic(0x0f, true);
pub(crate) const SGL_TYPE_INVALID: Status = generic(0x11, true);
pub(crate) const INVALID_PRP_OFFSET: Status = generic(0x13, true);
pub(crate) const LBA_OUT_OF_RANGE: Status = generic(0x80, true);

pub(crate) const COMPLETION_QUEUE_INVALID: Status = specific(0x00);
pub(crate) const INVALID_QUEUE_ID: Status = specific(0x01);
pub(crate) const INVALID_QUEUE_SIZE: Status = specific(0x02);
pub(crate) const AER_LIMIT_EXCEEDED: Status = specific(0x05);
pub(crate) const INVALID_INTERRUPT_VECTOR: Status = specific(0x08);
pub(crate) const INVALID_LOG_PAGE: Status = specific(0x09);
pub(crate) const INVALID_QUEUE_DELETION: Status = specific(0x0c);
