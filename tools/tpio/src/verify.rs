//! Verifiable blocks: what a verify write puts in a block and how a read proves it came back.
//!
//! Every written block starts with a 32-byte little-endian header:
//!
//! | bytes  | field                                                        |
//! |--------|--------------------------------------------------------------|
//! | 0..8   | magic `TPIOVRFY`                                             |
//! | 8..16  | the block's byte offset on the target                        |
//! | 16..24 | generation (derived from `randseed` and the pass number)     |
//! | 24..28 | block length                                                 |
//! | 28..32 | CRC32C of bytes 0..28 and 32..len (`verify=crc32c`), else 0  |
//!
//! and the rest is a pseudo-random payload generated from (generation, offset). `crc32c` checks the
//! checksum; `pattern` regenerates the payload and compares every byte. Both check the header's
//! offset and length, which catches misdirected or torn writes, and, when the reader knows which
//! generation it expects (the read-back phase of the same job), a stale block from an earlier run.

use crate::options::VerifyKind;
use crate::workload::{mix64, SplitMix64};

/// Size of the block header.
pub const HEADER_BYTES: usize = 32;
const MAGIC: &[u8; 8] = b"TPIOVRFY";

/// Why a block failed verification.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum MismatchReason {
    /// No tpio header: never written by a verify job, or overwritten.
    BadMagic,
    /// The header belongs to another offset (misdirected write or read).
    WrongOffset {
        /// Offset found in the header.
        found: u64,
    },
    /// The header was written with another block length.
    WrongLength {
        /// Length found in the header.
        found: u32,
    },
    /// The header is from another run or pass.
    WrongGeneration {
        /// Expected generation.
        expected: u64,
        /// Found generation.
        found: u64,
    },
    /// The CRC stored in the header does not match the data.
    Crc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the data read.
        computed: u32,
    },
    /// A payload byte differs from the pattern.
    Pattern {
        /// Byte offset within the block of the first difference.
        first_bad_byte: usize,
    },
}

/// A block that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// The block's byte offset on the target.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// What was wrong.
    #[serde(flatten)]
    pub reason: MismatchReason,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block at offset {} (0x{:x}), {} bytes: ",
            self.offset, self.offset, self.len
        )?;
        match &self.reason {
            MismatchReason::BadMagic => write!(f, "no tpio verify header"),
            MismatchReason::WrongOffset { found } => write!(f, "header says offset {found}"),
            MismatchReason::WrongLength { found } => write!(f, "header says length {found}"),
            MismatchReason::WrongGeneration { expected, found } => {
                write!(
                    f,
                    "generation {found:#x}, expected {expected:#x} (stale data)"
                )
            }
            MismatchReason::Crc { stored, computed } => {
                write!(
                    f,
                    "crc32c {computed:#010x} does not match stored {stored:#010x}"
                )
            }
            MismatchReason::Pattern { first_bad_byte } => {
                write!(f, "pattern differs from byte {first_bad_byte}")
            }
        }
    }
}

/// The generation stamped on blocks written in `pass` by a job seeded with `seed`.
pub fn generation(seed: u64, pass: u64) -> u64 {
    mix64(seed) ^ pass
}

/// Fills `payload` with the pattern of (generation, offset).
fn fill_payload(payload: &mut [u8], generation: u64, offset: u64) {
    let mut generator = SplitMix64::new(mix64(generation ^ offset.rotate_left(17)));
    for chunk in payload.chunks_mut(8) {
        let bytes = generator.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// CRC32C over the header without its CRC field, then the payload.
fn block_crc(block: &[u8]) -> u32 {
    let head = crc32c::crc32c(&block[..28]);
    crc32c::crc32c_append(head, &block[HEADER_BYTES..])
}

/// Writes a verifiable block for `offset` into `block` (its whole length).
/// `block.len()` must be at least [`HEADER_BYTES`] (every block is at least 512 bytes).
pub fn fill_block(kind: VerifyKind, block: &mut [u8], offset: u64, generation: u64) {
    if block.len() < HEADER_BYTES {
        return;
    }
    let len = block.len() as u32;
    block[0..8].copy_from_slice(MAGIC);
    block[8..16].copy_from_slice(&offset.to_le_bytes());
    block[16..24].copy_from_slice(&generation.to_le_bytes());
    block[24..28].copy_from_slice(&len.to_le_bytes());
    block[28..32].fill(0);
    fill_payload(&mut block[HEADER_BYTES..], generation, offset);
    if kind == VerifyKind::Crc32c {
        let crc = block_crc(block);
        block[28..32].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Reads a little-endian u64 at `at` (the caller checked the length).
fn le_u64(block: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Reads a little-endian u32 at `at` (the caller checked the length).
fn le_u32(block: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&block[at..at + 4]);
    u32::from_le_bytes(bytes)
}

/// Checks a block read from `offset`; `expected_generation` is `None` when any generation will do.
pub fn check_block(
    kind: VerifyKind,
    block: &[u8],
    offset: u64,
    expected_generation: Option<u64>,
) -> Result<(), Mismatch> {
    let len = block.len() as u32;
    let mismatch = |reason| {
        Err(Mismatch {
            offset,
            len,
            reason,
        })
    };
    if block.len() < HEADER_BYTES || &block[0..8] != MAGIC {
        return mismatch(MismatchReason::BadMagic);
    }
    let found_offset = le_u64(block, 8);
    if found_offset != offset {
        return mismatch(MismatchReason::WrongOffset {
            found: found_offset,
        });
    }
    let found_len = le_u32(block, 24);
    if found_len != len {
        return mismatch(MismatchReason::WrongLength { found: found_len });
    }
    let found_generation = le_u64(block, 16);
    if let Some(expected) = expected_generation {
        if found_generation != expected {
            return mismatch(MismatchReason::WrongGeneration {
                expected,
                found: found_generation,
            });
        }
    }
    match kind {
        VerifyKind::None => Ok(()),
        VerifyKind::Crc32c => {
            let stored = le_u32(block, 28);
            let computed = block_crc(block);
            if stored != computed {
                return mismatch(MismatchReason::Crc { stored, computed });
            }
            Ok(())
        }
        VerifyKind::Pattern => {
            let mut expected = vec![0u8; block.len() - HEADER_BYTES];
            fill_payload(&mut expected, found_generation, offset);
            match block[HEADER_BYTES..]
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
            {
                Some(index) => mismatch(MismatchReason::Pattern {
                    first_bad_byte: HEADER_BYTES + index,
                }),
                None => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_block_checks_and_a_flipped_bit_does_not() {
        for kind in [VerifyKind::Crc32c, VerifyKind::Pattern] {
            let mut block = vec![0u8; 4096];
            fill_block(kind, &mut block, 8192, 77);
            assert_eq!(check_block(kind, &block, 8192, Some(77)), Ok(()));
            assert_eq!(check_block(kind, &block, 8192, None), Ok(()));
            let moved = check_block(kind, &block, 4096, None).expect_err("wrong offset");
            assert_eq!(moved.reason, MismatchReason::WrongOffset { found: 8192 });
            let stale = check_block(kind, &block, 8192, Some(78)).expect_err("stale");
            assert!(matches!(
                stale.reason,
                MismatchReason::WrongGeneration { .. }
            ));
            block[1000] ^= 0x10;
            let bad = check_block(kind, &block, 8192, Some(77)).expect_err("corrupted");
            assert_eq!(bad.offset, 8192);
            match kind {
                VerifyKind::Pattern => {
                    assert_eq!(
                        bad.reason,
                        MismatchReason::Pattern {
                            first_bad_byte: 1000
                        }
                    )
                }
                _ => assert!(matches!(bad.reason, MismatchReason::Crc { .. })),
            }
        }
    }

    #[test]
    fn zeroes_are_reported_as_missing_header() {
        let block = vec![0u8; 512];
        let bad = check_block(VerifyKind::Crc32c, &block, 0, None).expect_err("zeroes");
        assert_eq!(bad.reason, MismatchReason::BadMagic);
    }
}
