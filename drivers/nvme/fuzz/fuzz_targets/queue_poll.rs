//! Fuzz target: the real `QueuePair::poll` (not a copy) against a device that writes arbitrary
//! bytes into the completion ring of a real queue pair.
//!
//! `tidepool_nvme::fuzzing::poll_ring` (feature `fuzzing`) makes a queue pair of 2..=64
//! entries on a minimal fake NVMe function (registers only; DMA through the identity view of a
//! pool of 4 KiB pages), submits some commands, then alternates "the device writes input bytes
//! into the CQ ring at an input-chosen offset" and `poll`. It asserts after every poll that
//! the poll returned having taken at most entries − 1 entries, that only outstanding commands
//! were delivered (each once), and that an error (a reset) failed every outstanding command.
//! Any panic or hang is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tidepool_nvme::fuzzing::poll_ring(data);
});
