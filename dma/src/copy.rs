//! The one audited routine that moves bytes between CPU memory and device-visible memory.
//!
//! Every bounce copy (caller memory ↔ pool buffer) and every zeroing of a buffer handed to a
//! device goes through this module. Nothing else in Tidepool touches device-visible bytes.
//!
//! ## Rules for device-visible memory
//! - **No references.** A device (or, in a confidential VM, an untrusted host) may change
//!   device-visible memory at any time. A Rust `&[u8]`/`&mut [u8]` over it would promise the
//!   compiler that it does not change (or that nobody else looks at it), which is undefined
//!   behaviour and lets the compiler read a byte twice. The API therefore takes raw pointers on
//!   the device side and slices only on the CPU-private side.
//! - **Single fetch.** [`copy_from_device`] reads every source byte exactly once: the bytes the
//!   caller gets are one snapshot that the device cannot change afterwards, so validating them
//!   and then using them is safe (no double-fetch/TOCTOU). The x86_64 kernels guarantee this by
//!   construction: every load is an inline-assembly instruction the compiler can neither repeat
//!   nor merge, and the pieces a copy is cut into (vector blocks, then 16/8/4/2/1-byte tail
//!   pieces) never overlap — unlike `memcpy`, which loads the first and last 16 bytes of a
//!   17–32-byte copy with two overlapping loads.
//!
//! ## Why not `memcpy`
//! glibc's `memcpy` falls into two traps measured on the machines Tidepool is tested on:
//! 1. **4K aliasing (host, AMD EPYC with FSRM, glibc 2.36).** For copies of 2 KiB–128 KiB where
//!    `(dst - src) mod 4096` lies between 4 and 28, `memcpy` drops from ~45 GB/s to 1.6–2.5 GB/s:
//!    a 4 KiB copy takes 2.1 µs instead of ~60 ns. Two adjacent `Vec`s hit this, and so does a
//!    bounce buffer that happens to sit a few bytes after the caller's data modulo 4 KiB. On
//!    that CPU the culprit is `rep movsb` itself (which glibc uses there): the `copy` bench
//!    measures a bare `rep movsb` at 1.2–1.7 GB/s for `delta` 4 and 16 at every size from 512 B
//!    to 256 KiB, and at full speed for `delta` 0, 32, 63, 256, 1024 and 4092. On Intel CPUs the
//!    same effect is documented for ordinary loads: a load whose address matches a pending
//!    store in bits 11:0 is assumed to depend on it and waits ("4K aliasing").
//! 2. **`rep movsb` under emulation (guest, QEMU TCG).** Above 8 KiB glibc switches to
//!    `rep movsb` (the emulated CPU reports ERMS but not FSRM) and TCG executes `rep movsb` at
//!    ~24 MB/s: a 128 KiB copy took 5.1 ms instead of ~0.17 ms with an SSE2 loop.
//!
//! ## The algorithm
//! The x86_64 kernels copy with unaligned 16-byte (SSE2) or 32-byte (AVX) vector loads and
//! stores, four vectors per loop iteration, after copying a short head with 1/2/4/8/16-byte
//! pieces so that the vector *stores* are aligned (large copies only), and finish with the same
//! pieces. They avoid 4K aliasing by choosing the direction: with `delta = (dst - src) mod 4096`,
//! a forward copy issues the load of `src + i + delta` right after the store to `dst + i`, which
//! has the same address bits 11:0, so for a small `delta` every load waits for a store. Copying
//! backwards turns that distance into `4096 - delta`, by which time the store has long left the
//! store buffer. So: `delta` in `1..2048` → copy backwards, otherwise forwards; either way a load
//! never aliases a store issued less than 2 KiB of copying earlier. The choice costs nothing:
//! on the AMD host the vector loops measured the same forwards and backwards (with the rule
//! disabled, a forward AVX copy at `delta` 4 ran as fast as at `delta` 0), and the `copy` bench
//! shows no slow offset pair for them.
//!
//! `rep movsb` is used only by [`Implementation::RepMovsb`], which detection picks only on a CPU
//! that reports FSRM (fast short `rep movsb`, CPUID.(EAX=7,ECX=0):EDX bit 4; an emulator that
//! reports FSRM claims to run it fast) and has no AVX. Even then a copy whose `delta` lies in
//! `1..64` goes to the backward vector loop instead, because `rep movsb` is slow there (trap 1)
//! and cannot copy backwards quickly.
//!
//! Zeroing uses the same vector store loop (`rep stosb` has the same emulation problem).
//!
//! ## How the implementation is chosen
//! Once per process, on first use (the choice is cached in an atomic; the choice is idempotent
//! in effect, so a race between two first users is harmless), [`Implementation::calibrate`]
//! times the candidates that feature detection allows and keeps the fastest: under QEMU's TCG
//! the CPU reports AVX, yet the SSE2 loop runs ~1.7x faster there. Feature detection alone
//! ([`Implementation::detect`]) says:
//! - x86_64 with AVX → [`Implementation::Avx`]. On the AMD host (FSRM *and* AVX) the `copy`
//!   bench found the AVX loop as fast as `rep movsb` (outside its slow window) from 4 KiB to
//!   256 KiB and faster at 512 B (~25–50 ns against ~35–110 ns: `rep movsb` has a start-up
//!   cost), so FSRM alone is not a reason to prefer it;
//! - x86_64 without AVX but with FSRM and ERMS → [`Implementation::RepMovsb`] (the only loop
//!   left would move 16 bytes per instruction);
//! - other x86_64 → [`Implementation::Sse2`] (SSE2 is part of the x86_64 baseline);
//! - other architectures → [`Implementation::Portable`], which is
//!   `core::ptr::copy_nonoverlapping`/`write_bytes`: the platform `memcpy`. It does not promise
//!   single fetch in the strict sense (a `memcpy` may read a byte twice with overlapping loads;
//!   every destination byte still ends up holding a value the source byte held).
//!
//! [`implementation`] names the active choice; [`force_implementation`] overrides it process-wide
//! (benches, the VM harness); [`Copier`] runs one explicit implementation without touching the
//! process-wide choice (tests).
//!
//! ```
//! use tidepool::copy;
//!
//! let device_buffer = vec![0u8; 64].into_boxed_slice();
//! let device_ptr = Box::into_raw(device_buffer) as *mut u8;
//! let request = [7u8; 64];
//! // SAFETY: `device_ptr` is valid for 64 bytes and does not overlap `request` or `reply`.
//! unsafe { copy::copy_to_device(&request, device_ptr) };
//! let mut reply = [0u8; 64];
//! unsafe { copy::copy_from_device(device_ptr, &mut reply) };
//! assert_eq!(reply, request);
//! unsafe { copy::zero_device(device_ptr, 64) };
//! # drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(device_ptr, 64)) });
//! println!("copied with {}", copy::implementation());
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// Copies `src` into device-visible memory at `dst`, using the active implementation.
///
/// Lock-free; safe to call from any thread.
///
/// # Safety
/// `dst` must be valid for `src.len()` bytes of writes and must not overlap `src`.
pub unsafe fn copy_to_device(src: &[u8], dst: *mut u8) {
    // SAFETY: forwarded from the caller: `src` is a valid slice, `dst` is valid for
    // `src.len()` writes and does not overlap it.
    unsafe { Copier::active().copy_raw(src.as_ptr(), dst, src.len()) }
}

/// Copies `dst.len()` bytes of device-visible memory at `src` into `dst`, reading every source
/// byte exactly once (see the module doc: single fetch), using the active implementation.
///
/// Lock-free; safe to call from any thread.
///
/// # Safety
/// `src` must be valid for `dst.len()` bytes of reads and must not overlap `dst`.
pub unsafe fn copy_from_device(src: *const u8, dst: &mut [u8]) {
    // SAFETY: forwarded from the caller: `src` is valid for `dst.len()` reads and does not
    // overlap `dst`, a valid exclusive slice.
    unsafe { Copier::active().copy_raw(src, dst.as_mut_ptr(), dst.len()) }
}

/// Sets `len` bytes of device-visible memory at `dst` to zero, using the active implementation.
///
/// Lock-free; safe to call from any thread.
///
/// # Safety
/// `dst` must be valid for `len` bytes of writes.
pub unsafe fn zero_device(dst: *mut u8, len: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { Copier::active().zero(dst, len) }
}

/// Copies `len` bytes from `src` to `dst` where either side (or both) may be device-visible
/// memory, reading every source byte exactly once, using the active implementation.
///
/// Lock-free; safe to call from any thread.
///
/// # Safety
/// `src` must be valid for `len` reads, `dst` valid for `len` writes, and the two ranges must
/// not overlap.
pub unsafe fn copy_raw(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { Copier::active().copy_raw(src, dst, len) }
}

/// The name of the implementation the free functions of this module use ("avx", "sse2",
/// "rep-movsb", "portable"), detecting it first if nothing has been chosen yet.
pub fn implementation() -> &'static str {
    Copier::active().implementation().name()
}

/// Makes `implementation` the one the free functions of this module use, for the whole process,
/// and returns the one that was active before.
///
/// Meant for benchmarks and test harnesses (e.g. to measure the SSE2 loop inside a guest that
/// would pick AVX). Copies already running in other threads finish with the old choice.
///
/// # Errors
/// [`CopyError::Unavailable`] if this CPU cannot run `implementation`; nothing changes then.
pub fn force_implementation(implementation: Implementation) -> Result<Implementation, CopyError> {
    let copier = Copier::new(implementation)?;
    let previous = Copier::active().implementation();
    ACTIVE.store(copier.implementation as u8, Ordering::Relaxed);
    Ok(previous)
}

/// Why a copy implementation could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// The CPU lacks an instruction set extension the implementation needs.
    #[error(
        "copy implementation `{0}` cannot run on this CPU (missing instruction set extension); \
         pick one of Implementation::available()"
    )]
    Unavailable(&'static str),
    /// A name that is no implementation.
    #[error("unknown copy implementation `{0}`: expected avx, sse2, rep-movsb or portable")]
    UnknownName(String),
}

/// One way of moving bytes. See the module doc for what each does and when it is chosen.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Implementation {
    /// `core::ptr::copy_nonoverlapping` and `write_bytes`: the platform `memcpy`/`memset`. The
    /// fallback for targets other than x86_64; on x86_64 only for comparison.
    Portable = 1,
    /// 16-byte SSE2 loads and stores, direction chosen against 4K aliasing (x86_64 only).
    Sse2 = 2,
    /// 32-byte AVX loads and stores, direction chosen against 4K aliasing (x86_64 with AVX).
    Avx = 3,
    /// `rep movsb` (x86_64 with ERMS), except when `(dst - src) mod 4096` is in `1..64`, where
    /// it uses the AVX (or SSE2) backward loop; zeroing uses the vector loop.
    RepMovsb = 4,
}

/// Every implementation, in the order [`Implementation::available`] lists them.
const ALL: [Implementation; 4] = [
    Implementation::Avx,
    Implementation::Sse2,
    Implementation::RepMovsb,
    Implementation::Portable,
];

impl Implementation {
    /// The name [`implementation`] reports and [`FromStr`] accepts.
    pub const fn name(self) -> &'static str {
        match self {
            Implementation::Portable => "portable",
            Implementation::Sse2 => "sse2",
            Implementation::Avx => "avx",
            Implementation::RepMovsb => "rep-movsb",
        }
    }

    /// Whether this CPU can run the implementation.
    pub fn is_available(self) -> bool {
        match self {
            Implementation::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Implementation::Sse2 => true,
            #[cfg(target_arch = "x86_64")]
            Implementation::Avx => std::arch::is_x86_feature_detected!("avx"),
            #[cfg(target_arch = "x86_64")]
            Implementation::RepMovsb => x86::has_erms(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The implementations this CPU can run.
    pub fn available() -> impl Iterator<Item = Implementation> {
        ALL.into_iter()
            .filter(|implementation| implementation.is_available())
    }

    /// The implementation this module picks for this CPU when nothing is forced.
    ///
    /// The rule (the module doc says why): `avx` where the CPU has AVX, else `rep-movsb` where
    /// it reports FSRM and ERMS, else `sse2` on x86_64; `portable` elsewhere.
    pub fn detect() -> Implementation {
        #[cfg(target_arch = "x86_64")]
        {
            if Implementation::Avx.is_available() {
                return Implementation::Avx;
            }
            if x86::has_fsrm() && x86::has_erms() {
                return Implementation::RepMovsb;
            }
            Implementation::Sse2
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Implementation::Portable
        }
    }

    /// The implementation the free functions use when nothing is forced: among the candidates
    /// feature detection allows (AVX and SSE2 on x86_64, plus `rep movsb` where [`detect`]
    /// would pick it), the fastest on a short start-up measurement — a 16 KiB copy, median of
    /// 5 runs each, ~50 µs on real hardware, ~1 ms under emulation.
    ///
    /// Feature flags alone mislead under emulation: QEMU's TCG reports AVX but runs it ~1.7x
    /// slower than SSE2 (the `copy_bench` VM run: 128 KiB in 200 µs with AVX, 120 µs with
    /// SSE2, 5.8 ms with glibc's `memcpy`). With one candidate, no measurement is made.
    ///
    /// [`detect`]: Implementation::detect
    pub fn calibrate() -> Implementation {
        let detected = Implementation::detect();
        let mut candidates: Vec<Implementation> = [Implementation::Avx, Implementation::Sse2]
            .into_iter()
            .filter(|i| i.is_available())
            .collect();
        if detected == Implementation::RepMovsb {
            candidates.push(detected);
        }
        if candidates.len() < 2 {
            return detected;
        }
        const LEN: usize = 16 << 10;
        // Source and destination 1 KiB apart modulo 4 KiB: outside every slow window.
        let mut buf = vec![0x5au8; 2 * LEN + 8192];
        let (src, dst) = buf.split_at_mut(LEN + 4096 + 1024);
        let mut time = |copier: Copier| {
            let mut runs = [std::time::Duration::ZERO; 5];
            for run in runs.iter_mut() {
                let t = std::time::Instant::now();
                // SAFETY: two disjoint private buffers of at least LEN bytes.
                unsafe { copier.copy_raw(src.as_ptr(), dst.as_mut_ptr(), LEN) };
                *run = t.elapsed();
            }
            runs.sort();
            runs[2]
        };
        let timed: Vec<_> = candidates
            .into_iter()
            .filter_map(|i| Copier::new(i).ok())
            .map(|c| (time(c), c.implementation))
            .collect();
        timed
            .into_iter()
            .min_by_key(|&(t, _)| t)
            .map_or(detected, |(_, i)| i)
    }

    /// The inverse of `as u8`, for the value cached in [`ACTIVE`].
    fn from_u8(value: u8) -> Option<Implementation> {
        ALL.into_iter()
            .find(|implementation| *implementation as u8 == value)
    }
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Implementation {
    type Err = CopyError;

    /// Parses a name as [`Implementation::name`] writes it.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        ALL.into_iter()
            .find(|implementation| implementation.name() == name)
            .ok_or_else(|| CopyError::UnknownName(name.to_owned()))
    }
}

/// The process-wide choice: an `Implementation as u8` that is known to be available, or 0 for
/// "not detected yet".
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// An implementation this CPU is known to be able to run: the capability to copy with it.
///
/// Obtained from [`Copier::new`] (checked) or [`Copier::active`]. Copying through a `Copier`
/// does not read or change the process-wide choice, so tests can exercise every implementation
/// in parallel.
///
/// ```
/// use tidepool::copy::{Copier, Implementation};
///
/// for implementation in Implementation::available() {
///     let copier = Copier::new(implementation).unwrap();
///     let src = [1u8, 2, 3];
///     let mut dst = [0u8; 3];
///     // SAFETY: both pointers are valid for 3 bytes and do not overlap.
///     unsafe { copier.copy_raw(src.as_ptr(), dst.as_mut_ptr(), 3) };
///     assert_eq!(dst, src);
/// }
/// ```
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Copier {
    implementation: Implementation,
}

impl Copier {
    /// A copier for `implementation`.
    ///
    /// # Errors
    /// [`CopyError::Unavailable`] if this CPU cannot run it.
    pub fn new(implementation: Implementation) -> Result<Copier, CopyError> {
        if implementation.is_available() {
            Ok(Copier { implementation })
        } else {
            Err(CopyError::Unavailable(implementation.name()))
        }
    }

    /// The copier the free functions use: the forced one, or the detected one (detecting it on
    /// first use; a relaxed atomic load afterwards).
    pub fn active() -> Copier {
        match Implementation::from_u8(ACTIVE.load(Ordering::Relaxed)) {
            Some(implementation) => Copier { implementation },
            None => {
                let detected = Implementation::calibrate();
                // Only fill an empty slot: overwriting would undo a concurrent
                // `force_implementation`.
                let implementation = match ACTIVE.compare_exchange(
                    0,
                    detected as u8,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => detected,
                    Err(current) => Implementation::from_u8(current).unwrap_or(detected),
                };
                Copier { implementation }
            }
        }
    }

    /// Which implementation this copier runs.
    pub fn implementation(self) -> Implementation {
        self.implementation
    }

    /// Copies `len` bytes from `src` to `dst`, reading every source byte exactly once (except
    /// with [`Implementation::Portable`], see the module doc).
    ///
    /// # Safety
    /// `src` must be valid for `len` reads, `dst` valid for `len` writes, and the two ranges
    /// must not overlap.
    pub unsafe fn copy_raw(self, src: *const u8, dst: *mut u8, len: usize) {
        match self.implementation {
            #[cfg(target_arch = "x86_64")]
            Implementation::Sse2 => {
                // SAFETY: pointers per the caller; SSE2 is baseline on x86_64.
                unsafe { x86::copy_sse2(src, dst, len) }
            }
            #[cfg(target_arch = "x86_64")]
            Implementation::Avx => {
                // SAFETY: pointers per the caller; a `Copier` for Avx exists only if the CPU
                // has AVX (`Copier::new` checked it).
                unsafe { x86::copy_avx(src, dst, len) }
            }
            #[cfg(target_arch = "x86_64")]
            Implementation::RepMovsb => {
                // SAFETY: pointers per the caller; a `Copier` for RepMovsb exists only if the
                // CPU has ERMS.
                unsafe { x86::copy_rep_movsb(src, dst, len) }
            }
            _ => {
                // SAFETY: pointers per the caller, exactly `copy_nonoverlapping`'s contract.
                unsafe { core::ptr::copy_nonoverlapping(src, dst, len) }
            }
        }
    }

    /// Sets `len` bytes at `dst` to zero.
    ///
    /// # Safety
    /// `dst` must be valid for `len` writes.
    pub unsafe fn zero(self, dst: *mut u8, len: usize) {
        match self.implementation {
            #[cfg(target_arch = "x86_64")]
            Implementation::Sse2 => {
                // SAFETY: `dst` per the caller; SSE2 is baseline on x86_64.
                unsafe { x86::zero_sse2(dst, len) }
            }
            #[cfg(target_arch = "x86_64")]
            Implementation::Avx | Implementation::RepMovsb => {
                // SAFETY: `dst` per the caller; `zero_vector` picks AVX only if detected.
                unsafe { x86::zero_vector(dst, len) }
            }
            _ => {
                // SAFETY: `dst` per the caller, exactly `write_bytes`'s contract.
                unsafe { core::ptr::write_bytes(dst, 0, len) }
            }
        }
    }
}

/// The x86_64 kernels. Every access to the copied memory is an inline-assembly instruction (so
/// the compiler can neither repeat, merge, widen nor turn it into a `memcpy` call), and the
/// pieces a copy is cut into never overlap (single fetch).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::__cpuid_count;

    /// Copies of at least this many bytes first align the destination to the vector width, so
    /// that no vector store splits a cache line. Below it the few extra pieces cost more than
    /// the split stores.
    const ALIGN_MIN_LEN: usize = 256;

    /// `(dst - src) mod 4096` below which (and above 0) a forward copy would make loads alias
    /// recent stores: copy backwards instead.
    const ALIAS_WINDOW: usize = 2048;

    /// `(dst - src) mod 4096` below which (and above 0) `rep movsb` is slow (measured: 4 and
    /// 16 slow, 32 and more fast, on AMD EPYC with FSRM; 64 leaves a margin): use the vector
    /// loop instead.
    const REP_MOVSB_ALIAS_WINDOW: usize = 64;

    /// Whether the CPU reports fast short `rep movsb` (CPUID.(EAX=7,ECX=0):EDX bit 4).
    pub(super) fn has_fsrm() -> bool {
        // SAFETY: CPUID is present on every x86_64 CPU; leaf 0 is always valid and says
        // whether leaf 7 is.
        #[allow(unused_unsafe)]
        let max_leaf = unsafe { __cpuid_count(0, 0) }.eax;
        if max_leaf < 7 {
            return false;
        }
        // SAFETY: leaf 7 exists (checked above).
        #[allow(unused_unsafe)]
        let leaf7 = unsafe { __cpuid_count(7, 0) };
        leaf7.edx & (1 << 4) != 0
    }

    /// Whether the CPU reports enhanced `rep movsb`/`stosb` (ERMS).
    pub(super) fn has_erms() -> bool {
        std::arch::is_x86_feature_detected!("ermsb")
    }

    /// Whether a forward copy from `src` to `dst` would suffer 4K aliasing.
    #[inline(always)]
    fn forward_aliases(src: *const u8, dst: *const u8) -> bool {
        let delta = (dst as usize).wrapping_sub(src as usize) % 4096;
        delta != 0 && delta < ALIAS_WINDOW
    }

    /// Whether `rep movsb` from `src` to `dst` would be slow (see [`REP_MOVSB_ALIAS_WINDOW`]).
    #[inline(always)]
    fn rep_movsb_aliases(src: *const u8, dst: *const u8) -> bool {
        let delta = (dst as usize).wrapping_sub(src as usize) % 4096;
        delta != 0 && delta < REP_MOVSB_ALIAS_WINDOW
    }

    /// [`forward_aliases`] on addresses, for the tests of the direction rule.
    #[cfg(test)]
    pub(super) fn forward_aliases_for_test(src: usize, dst: usize) -> bool {
        forward_aliases(src as *const u8, dst as *const u8)
    }

    /// [`rep_movsb_aliases`] on addresses, for the tests of the `rep movsb` rule.
    #[cfg(test)]
    pub(super) fn rep_movsb_aliases_for_test(src: usize, dst: usize) -> bool {
        rep_movsb_aliases(src as *const u8, dst as *const u8)
    }

    /// One vector width's kernels: SSE2 (16 bytes) or AVX (32 bytes).
    ///
    /// # Safety (all methods)
    /// Every pointer must be valid for the bytes the method names; source and destination must
    /// not overlap; the CPU must support the instruction set (callers are `#[target_feature]`
    /// functions only entered after detection).
    trait Lanes {
        /// Bytes per vector.
        const WIDTH: usize;
        /// Copies `4 * WIDTH` bytes: four loads, then four stores.
        unsafe fn move_block(src: *const u8, dst: *mut u8);
        /// Copies `WIDTH` bytes.
        unsafe fn move_vector(src: *const u8, dst: *mut u8);
        /// Copies 16 bytes with the encoding that matches `WIDTH` (VEX for AVX, so that no
        /// SSE/AVX transition penalty is paid).
        unsafe fn move_16(src: *const u8, dst: *mut u8);
        /// Zeroes `4 * WIDTH` bytes.
        unsafe fn zero_block(dst: *mut u8);
        /// Zeroes `WIDTH` bytes.
        unsafe fn zero_vector(dst: *mut u8);
        /// Zeroes 16 bytes.
        unsafe fn zero_16(dst: *mut u8);
        /// Leaves the vector unit clean for the caller (`vzeroupper` after AVX).
        unsafe fn finish();
    }

    /// Generates `move_N(src, dst)` for a general-purpose register width.
    macro_rules! scalar_move {
        ($name:ident, $bytes:literal, $ptr:literal, $modifier:literal) => {
            #[doc = concat!("Copies ", $bytes, " bytes with one load and one store.")]
            ///
            /// # Safety
            /// `src` valid for that many reads, `dst` for that many writes.
            #[inline(always)]
            unsafe fn $name(src: *const u8, dst: *mut u8) {
                // SAFETY: the caller guarantees both pointers are valid for this width; the
                // instructions touch exactly those bytes and no stack or flags.
                unsafe {
                    asm!(
                        concat!("mov {t:", $modifier, "}, ", $ptr, " ptr [{s}]"),
                        concat!("mov ", $ptr, " ptr [{d}], {t:", $modifier, "}"),
                        s = in(reg) src,
                        d = in(reg) dst,
                        t = out(reg) _,
                        options(nostack, preserves_flags),
                    )
                }
            }
        };
    }
    scalar_move!(move_8, 8, "qword", "r");
    scalar_move!(move_4, 4, "dword", "e");
    scalar_move!(move_2, 2, "word", "x");

    /// Copies 1 byte.
    ///
    /// # Safety
    /// `src` valid for 1 read, `dst` for 1 write.
    #[inline(always)]
    unsafe fn move_1(src: *const u8, dst: *mut u8) {
        // SAFETY: the caller guarantees both pointers are valid for one byte.
        unsafe {
            asm!(
                "mov {t}, byte ptr [{s}]",
                "mov byte ptr [{d}], {t}",
                s = in(reg) src,
                d = in(reg) dst,
                t = out(reg_byte) _,
                options(nostack, preserves_flags),
            )
        }
    }

    /// Zeroes `len < 16` bytes at `dst` with 8/4/2/1-byte stores.
    ///
    /// # Safety
    /// `dst` valid for `len` writes.
    #[inline(always)]
    unsafe fn zero_small(dst: *mut u8, len: usize) {
        // SAFETY: the caller guarantees `dst..dst+len` is writable; the stores below cover
        // exactly that range (bits 3..0 of `len`), each inside it.
        unsafe {
            let mut at = dst;
            if len & 8 != 0 {
                asm!("mov qword ptr [{d}], 0", d = in(reg) at, options(nostack, preserves_flags));
                at = at.add(8);
            }
            if len & 4 != 0 {
                asm!("mov dword ptr [{d}], 0", d = in(reg) at, options(nostack, preserves_flags));
                at = at.add(4);
            }
            if len & 2 != 0 {
                asm!("mov word ptr [{d}], 0", d = in(reg) at, options(nostack, preserves_flags));
                at = at.add(2);
            }
            if len & 1 != 0 {
                asm!("mov byte ptr [{d}], 0", d = in(reg) at, options(nostack, preserves_flags));
            }
        }
    }

    /// The SSE2 kernels (16-byte `movdqu`).
    struct Sse2;

    impl Lanes for Sse2 {
        const WIDTH: usize = 16;

        #[inline(always)]
        unsafe fn move_block(src: *const u8, dst: *mut u8) {
            // SAFETY: per the trait contract, 64 bytes at each pointer are valid.
            unsafe {
                asm!(
                    "movdqu {a}, xmmword ptr [{s}]",
                    "movdqu {b}, xmmword ptr [{s} + 16]",
                    "movdqu {c}, xmmword ptr [{s} + 32]",
                    "movdqu {e}, xmmword ptr [{s} + 48]",
                    "movdqu xmmword ptr [{d}], {a}",
                    "movdqu xmmword ptr [{d} + 16], {b}",
                    "movdqu xmmword ptr [{d} + 32], {c}",
                    "movdqu xmmword ptr [{d} + 48], {e}",
                    s = in(reg) src,
                    d = in(reg) dst,
                    a = out(xmm_reg) _,
                    b = out(xmm_reg) _,
                    c = out(xmm_reg) _,
                    e = out(xmm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline(always)]
        unsafe fn move_vector(src: *const u8, dst: *mut u8) {
            // SAFETY: per the trait contract.
            unsafe { Self::move_16(src, dst) }
        }

        #[inline(always)]
        unsafe fn move_16(src: *const u8, dst: *mut u8) {
            // SAFETY: per the trait contract, 16 bytes at each pointer are valid.
            unsafe {
                asm!(
                    "movdqu {a}, xmmword ptr [{s}]",
                    "movdqu xmmword ptr [{d}], {a}",
                    s = in(reg) src,
                    d = in(reg) dst,
                    a = out(xmm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline(always)]
        unsafe fn zero_block(dst: *mut u8) {
            // SAFETY: per the trait contract, 64 bytes at `dst` are writable.
            unsafe {
                asm!(
                    "xorps {z}, {z}",
                    "movdqu xmmword ptr [{d}], {z}",
                    "movdqu xmmword ptr [{d} + 16], {z}",
                    "movdqu xmmword ptr [{d} + 32], {z}",
                    "movdqu xmmword ptr [{d} + 48], {z}",
                    d = in(reg) dst,
                    z = out(xmm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline(always)]
        unsafe fn zero_vector(dst: *mut u8) {
            // SAFETY: per the trait contract.
            unsafe { Self::zero_16(dst) }
        }

        #[inline(always)]
        unsafe fn zero_16(dst: *mut u8) {
            // SAFETY: per the trait contract, 16 bytes at `dst` are writable.
            unsafe {
                asm!(
                    "xorps {z}, {z}",
                    "movdqu xmmword ptr [{d}], {z}",
                    d = in(reg) dst,
                    z = out(xmm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline(always)]
        unsafe fn finish() {}
    }

    /// The AVX kernels (32-byte `vmovdqu`). Only AVX (not AVX2) is needed for 256-bit moves.
    struct Avx;

    impl Lanes for Avx {
        const WIDTH: usize = 32;

        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn move_block(src: *const u8, dst: *mut u8) {
            // SAFETY: per the trait contract, 128 bytes at each pointer are valid and the CPU
            // has AVX.
            unsafe {
                asm!(
                    "vmovdqu {a}, ymmword ptr [{s}]",
                    "vmovdqu {b}, ymmword ptr [{s} + 32]",
                    "vmovdqu {c}, ymmword ptr [{s} + 64]",
                    "vmovdqu {e}, ymmword ptr [{s} + 96]",
                    "vmovdqu ymmword ptr [{d}], {a}",
                    "vmovdqu ymmword ptr [{d} + 32], {b}",
                    "vmovdqu ymmword ptr [{d} + 64], {c}",
                    "vmovdqu ymmword ptr [{d} + 96], {e}",
                    s = in(reg) src,
                    d = in(reg) dst,
                    a = out(ymm_reg) _,
                    b = out(ymm_reg) _,
                    c = out(ymm_reg) _,
                    e = out(ymm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn move_vector(src: *const u8, dst: *mut u8) {
            // SAFETY: per the trait contract, 32 bytes at each pointer are valid; AVX present.
            unsafe {
                asm!(
                    "vmovdqu {a}, ymmword ptr [{s}]",
                    "vmovdqu ymmword ptr [{d}], {a}",
                    s = in(reg) src,
                    d = in(reg) dst,
                    a = out(ymm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn move_16(src: *const u8, dst: *mut u8) {
            // SAFETY: per the trait contract, 16 bytes at each pointer are valid; AVX present.
            unsafe {
                asm!(
                    "vmovdqu {a}, xmmword ptr [{s}]",
                    "vmovdqu xmmword ptr [{d}], {a}",
                    s = in(reg) src,
                    d = in(reg) dst,
                    a = out(xmm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn zero_block(dst: *mut u8) {
            // SAFETY: per the trait contract, 128 bytes at `dst` are writable; AVX present.
            unsafe {
                asm!(
                    "vxorps {z}, {z}, {z}",
                    "vmovdqu ymmword ptr [{d}], {z}",
                    "vmovdqu ymmword ptr [{d} + 32], {z}",
                    "vmovdqu ymmword ptr [{d} + 64], {z}",
                    "vmovdqu ymmword ptr [{d} + 96], {z}",
                    d = in(reg) dst,
                    z = out(ymm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn zero_vector(dst: *mut u8) {
            // SAFETY: per the trait contract, 32 bytes at `dst` are writable; AVX present.
            unsafe {
                asm!(
                    "vxorps {z}, {z}, {z}",
                    "vmovdqu ymmword ptr [{d}], {z}",
                    d = in(reg) dst,
                    z = out(ymm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn zero_16(dst: *mut u8) {
            // SAFETY: per the trait contract, 16 bytes at `dst` are writable; AVX present.
            unsafe {
                asm!(
                    "vxorps {z}, {z}, {z}",
                    "vmovdqu xmmword ptr [{d}], {z}",
                    d = in(reg) dst,
                    z = out(xmm_reg) _,
                    options(nostack, preserves_flags),
                )
            }
        }

        #[inline]
        #[target_feature(enable = "avx")]
        unsafe fn finish() {
            // SAFETY: `vzeroupper` only clears the upper halves of the vector registers, which
            // no caller expects preserved (they are caller-saved and our asm blocks declare
            // every vector register they use as clobbered).
            unsafe { asm!("vzeroupper", options(nostack, nomem, preserves_flags)) }
        }
    }

    /// Copies the low `pieces` bytes' worth of 1/2/4/8/16-byte pieces forwards: for each set
    /// bit of `pieces`, smallest first, one move of that size. Returns the advanced pointers.
    /// Used for the aligning head, so that each piece aligns the destination further.
    ///
    /// # Safety
    /// `pieces < 32`; both pointers valid for `pieces` bytes; no overlap.
    #[inline(always)]
    unsafe fn head_forward<L: Lanes>(
        mut src: *const u8,
        mut dst: *mut u8,
        pieces: usize,
    ) -> (*const u8, *mut u8) {
        // SAFETY: the pieces sum to `pieces` bytes, all inside the valid ranges, disjoint.
        unsafe {
            if pieces & 1 != 0 {
                move_1(src, dst);
                (src, dst) = (src.add(1), dst.add(1));
            }
            if pieces & 2 != 0 {
                move_2(src, dst);
                (src, dst) = (src.add(2), dst.add(2));
            }
            if pieces & 4 != 0 {
                move_4(src, dst);
                (src, dst) = (src.add(4), dst.add(4));
            }
            if pieces & 8 != 0 {
                move_8(src, dst);
                (src, dst) = (src.add(8), dst.add(8));
            }
            if pieces & 16 != 0 {
                L::move_16(src, dst);
                (src, dst) = (src.add(16), dst.add(16));
            }
        }
        (src, dst)
    }

    /// Copies `len < 32` bytes forwards, largest piece first.
    ///
    /// # Safety
    /// `len < 32`; both pointers valid for `len` bytes; no overlap.
    #[inline(always)]
    unsafe fn tail_forward<L: Lanes>(mut src: *const u8, mut dst: *mut u8, len: usize) {
        // SAFETY: the pieces sum to `len` bytes, all inside the valid ranges, disjoint.
        unsafe {
            if len & 16 != 0 {
                L::move_16(src, dst);
                (src, dst) = (src.add(16), dst.add(16));
            }
            if len & 8 != 0 {
                move_8(src, dst);
                (src, dst) = (src.add(8), dst.add(8));
            }
            if len & 4 != 0 {
                move_4(src, dst);
                (src, dst) = (src.add(4), dst.add(4));
            }
            if len & 2 != 0 {
                move_2(src, dst);
                (src, dst) = (src.add(2), dst.add(2));
            }
            if len & 1 != 0 {
                move_1(src, dst);
            }
        }
    }

    /// Copies `pieces < 32` bytes that *end* at `src_end`/`dst_end`, backwards, smallest piece
    /// first (so that each piece aligns the destination end further). Returns the lowered ends.
    ///
    /// # Safety
    /// `pieces < 32`; the `pieces` bytes below each end are valid; no overlap.
    #[inline(always)]
    unsafe fn pieces_backward<L: Lanes>(
        mut src_end: *const u8,
        mut dst_end: *mut u8,
        pieces: usize,
    ) -> (*const u8, *mut u8) {
        // SAFETY: the pieces sum to `pieces` bytes, all inside the valid ranges, disjoint.
        unsafe {
            if pieces & 1 != 0 {
                (src_end, dst_end) = (src_end.sub(1), dst_end.sub(1));
                move_1(src_end, dst_end);
            }
            if pieces & 2 != 0 {
                (src_end, dst_end) = (src_end.sub(2), dst_end.sub(2));
                move_2(src_end, dst_end);
            }
            if pieces & 4 != 0 {
                (src_end, dst_end) = (src_end.sub(4), dst_end.sub(4));
                move_4(src_end, dst_end);
            }
            if pieces & 8 != 0 {
                (src_end, dst_end) = (src_end.sub(8), dst_end.sub(8));
                move_8(src_end, dst_end);
            }
            if pieces & 16 != 0 {
                (src_end, dst_end) = (src_end.sub(16), dst_end.sub(16));
                L::move_16(src_end, dst_end);
            }
        }
        (src_end, dst_end)
    }

    /// Copies `len` bytes from low to high addresses.
    ///
    /// Head: if `len >= ALIGN_MIN_LEN`, pieces up to the next `WIDTH`-aligned destination.
    /// Body: blocks of four vectors, then single vectors. Tail: pieces, largest first.
    ///
    /// # Safety
    /// Both ranges valid for `len` bytes, disjoint; the CPU supports `L`.
    #[inline(always)]
    unsafe fn copy_forward<L: Lanes>(mut src: *const u8, mut dst: *mut u8, mut len: usize) {
        // SAFETY: every move below stays inside `[0, len)` of both ranges: `len` is reduced by
        // exactly what each step copies and each step only runs when `len` covers it.
        unsafe {
            if len >= ALIGN_MIN_LEN {
                let head = (dst as usize).wrapping_neg() & (L::WIDTH - 1);
                (src, dst) = head_forward::<L>(src, dst, head);
                len -= head;
            }
            while len >= 4 * L::WIDTH {
                L::move_block(src, dst);
                (src, dst) = (src.add(4 * L::WIDTH), dst.add(4 * L::WIDTH));
                len -= 4 * L::WIDTH;
            }
            while len >= L::WIDTH {
                L::move_vector(src, dst);
                (src, dst) = (src.add(L::WIDTH), dst.add(L::WIDTH));
                len -= L::WIDTH;
            }
            tail_forward::<L>(src, dst, len);
        }
    }

    /// Copies `len` bytes from high to low addresses: the mirror image of [`copy_forward`].
    ///
    /// # Safety
    /// Both ranges valid for `len` bytes, disjoint; the CPU supports `L`.
    #[inline(always)]
    unsafe fn copy_backward<L: Lanes>(src: *const u8, dst: *mut u8, mut len: usize) {
        // SAFETY: as in `copy_forward`, walking down from the ends: every move stays inside
        // `[0, len)` of both ranges.
        unsafe {
            let (mut src_end, mut dst_end) = (src.add(len), dst.add(len));
            if len >= ALIGN_MIN_LEN {
                let head = (dst_end as usize) & (L::WIDTH - 1);
                (src_end, dst_end) = pieces_backward::<L>(src_end, dst_end, head);
                len -= head;
            }
            while len >= 4 * L::WIDTH {
                (src_end, dst_end) = (src_end.sub(4 * L::WIDTH), dst_end.sub(4 * L::WIDTH));
                L::move_block(src_end, dst_end);
                len -= 4 * L::WIDTH;
            }
            while len >= L::WIDTH {
                (src_end, dst_end) = (src_end.sub(L::WIDTH), dst_end.sub(L::WIDTH));
                L::move_vector(src_end, dst_end);
                len -= L::WIDTH;
            }
            pieces_backward::<L>(src_end, dst_end, len);
        }
    }

    /// Copies in the direction that avoids 4K aliasing (see the module doc).
    ///
    /// # Safety
    /// Both ranges valid for `len` bytes, disjoint; the CPU supports `L`.
    #[inline(always)]
    unsafe fn copy_vector<L: Lanes>(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            if forward_aliases(src, dst) {
                copy_backward::<L>(src, dst, len);
            } else {
                copy_forward::<L>(src, dst, len);
            }
            L::finish();
        }
    }

    /// Zeroes `len` bytes: aligning head, blocks, vectors, tail.
    ///
    /// # Safety
    /// `dst` valid for `len` writes; the CPU supports `L`.
    #[inline(always)]
    unsafe fn zero_lanes<L: Lanes>(mut dst: *mut u8, mut len: usize) {
        // SAFETY: every store stays inside `[0, len)`, as in `copy_forward`.
        unsafe {
            if len >= ALIGN_MIN_LEN {
                let head = (dst as usize).wrapping_neg() & (L::WIDTH - 1);
                zero_small(dst, head & 15);
                dst = dst.add(head & 15);
                if head & 16 != 0 {
                    L::zero_16(dst);
                    dst = dst.add(16);
                }
                len -= head;
            }
            while len >= 4 * L::WIDTH {
                L::zero_block(dst);
                dst = dst.add(4 * L::WIDTH);
                len -= 4 * L::WIDTH;
            }
            while len >= L::WIDTH {
                L::zero_vector(dst);
                dst = dst.add(L::WIDTH);
                len -= L::WIDTH;
            }
            if len & 16 != 0 {
                L::zero_16(dst);
                dst = dst.add(16);
            }
            zero_small(dst, len & 15);
            L::finish();
        }
    }

    /// The SSE2 copy.
    ///
    /// # Safety
    /// Both ranges valid for `len` bytes, disjoint.
    pub(super) unsafe fn copy_sse2(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: forwarded; SSE2 is part of the x86_64 baseline.
        unsafe { copy_vector::<Sse2>(src, dst, len) }
    }

    /// The AVX copy.
    ///
    /// # Safety
    /// Both ranges valid for `len` bytes, disjoint; the CPU has AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn copy_avx(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: forwarded; AVX is enabled for this function and guaranteed by the caller.
        unsafe { copy_vector::<Avx>(src, dst, len) }
    }

    /// `rep movsb`, except where `dst - src` falls in `rep movsb`'s 4K-aliasing window, which
    /// goes to the (then backward) vector loop.
    ///
    /// # Safety
    /// Both ranges valid for `len` bytes, disjoint; the CPU has ERMS.
    pub(super) unsafe fn copy_rep_movsb(src: *const u8, dst: *mut u8, len: usize) {
        if rep_movsb_aliases(src, dst) {
            // SAFETY: forwarded; AVX is used only when detected.
            unsafe {
                if std::arch::is_x86_feature_detected!("avx") {
                    copy_avx(src, dst, len)
                } else {
                    copy_sse2(src, dst, len)
                }
            }
            return;
        }
        // SAFETY: the caller guarantees both ranges are valid for `len` bytes and disjoint;
        // `rep movsb` moves exactly `rcx` bytes from `[rsi]` to `[rdi]` upwards (the direction
        // flag is clear on entry to inline assembly, per the Rust ABI).
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rsi") src => _,
                inout("rdi") dst => _,
                options(nostack, preserves_flags),
            )
        }
    }

    /// The SSE2 zeroing loop.
    ///
    /// # Safety
    /// `dst` valid for `len` writes.
    pub(super) unsafe fn zero_sse2(dst: *mut u8, len: usize) {
        // SAFETY: forwarded; SSE2 is part of the x86_64 baseline.
        unsafe { zero_lanes::<Sse2>(dst, len) }
    }

    /// The AVX zeroing loop.
    ///
    /// # Safety
    /// `dst` valid for `len` writes; the CPU has AVX.
    #[target_feature(enable = "avx")]
    unsafe fn zero_avx(dst: *mut u8, len: usize) {
        // SAFETY: forwarded; AVX is enabled for this function and guaranteed by the caller.
        unsafe { zero_lanes::<Avx>(dst, len) }
    }

    /// The widest zeroing loop this CPU runs.
    ///
    /// # Safety
    /// `dst` valid for `len` writes.
    pub(super) unsafe fn zero_vector(dst: *mut u8, len: usize) {
        // SAFETY: forwarded; AVX is used only when detected.
        unsafe {
            if std::arch::is_x86_feature_detected!("avx") {
                zero_avx(dst, len)
            } else {
                zero_sse2(dst, len)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the destination buffer is filled with before a copy: any byte still holding it
    /// outside the copied range proves the copy stayed inside it.
    const GUARD: u8 = 0xA5;
    /// Offsets tried at each end (the brief: all of 0..64).
    const OFFSETS: usize = 64;
    /// Bytes after the copied range checked for untouched guards.
    const GUARD_LEN: usize = 64;

    /// A source pattern with period 256 that never equals [`GUARD`], so a byte that was not
    /// copied, or was copied to the wrong place, is always seen.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| match (i * 31 % 256) as u8 {
                GUARD => 0x11,
                byte => byte,
            })
            .collect()
    }

    /// A buffer whose start is 4096-aligned, so that offsets into two such buffers control
    /// `(dst - src) mod 4096` exactly (and with it the copy direction).
    struct PageAligned {
        bytes: Vec<u8>,
        start: usize,
    }

    impl PageAligned {
        fn new(len: usize) -> PageAligned {
            let bytes = vec![0u8; len + 4096];
            let start = (bytes.as_ptr() as usize).wrapping_neg() % 4096;
            PageAligned { bytes, start }
        }
        fn slice(&mut self) -> &mut [u8] {
            &mut self.bytes[self.start..]
        }
    }

    /// Copies `len` bytes from `src_off` in a source buffer to `dst_off` (plus `page_shift`
    /// bytes, to move `(dst - src) mod 4096` further) in a destination buffer with `copier`,
    /// and checks the copied bytes and the guard bytes around them.
    fn check_copy(
        copier: Copier,
        source: &[u8],
        dst_buf: &mut [u8],
        len: usize,
        src_off: usize,
        dst_off: usize,
    ) -> Result<(), String> {
        let region = dst_off + len + GUARD_LEN;
        dst_buf[..region].fill(GUARD);
        let src = &source[src_off..src_off + len];
        // SAFETY: `src` is `len` readable bytes; `dst_buf` has `len` writable bytes at
        // `dst_off` (region fits); the two are different allocations.
        unsafe { copier.copy_raw(src.as_ptr(), dst_buf.as_mut_ptr().add(dst_off), len) };
        let label = format!(
            "{} len {len} src_off {src_off} dst_off {dst_off}",
            copier.implementation()
        );
        if dst_buf[..dst_off].iter().any(|&b| b != GUARD) {
            return Err(format!("{label}: wrote before the destination"));
        }
        if &dst_buf[dst_off..dst_off + len] != src {
            return Err(format!("{label}: copied bytes differ"));
        }
        if dst_buf[dst_off + len..region].iter().any(|&b| b != GUARD) {
            return Err(format!("{label}: wrote past the end"));
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `off` in a buffer full of [`GUARD`] and checks exactly that
    /// range became zero.
    fn check_zero(copier: Copier, buf: &mut [u8], len: usize, off: usize) -> Result<(), String> {
        let region = off + len + GUARD_LEN;
        buf[..region].fill(GUARD);
        // SAFETY: `buf` has `len` writable bytes at `off`.
        unsafe { copier.zero(buf.as_mut_ptr().add(off), len) };
        let label = format!("{} zero len {len} off {off}", copier.implementation());
        if buf[..off].iter().any(|&b| b != GUARD) {
            return Err(format!("{label}: wrote before the range"));
        }
        if buf[off..off + len].iter().any(|&b| b != 0) {
            return Err(format!("{label}: range not zero"));
        }
        if buf[off + len..region].iter().any(|&b| b != GUARD) {
            return Err(format!("{label}: wrote past the end"));
        }
        Ok(())
    }

    fn copiers() -> Vec<Copier> {
        Implementation::available()
            .map(|implementation| Copier::new(implementation).expect("listed as available"))
            .collect()
    }

    #[test]
    fn every_implementation_copies_every_small_length_at_every_offset() {
        let source = {
            let mut buf = PageAligned::new(OFFSETS + 300);
            let pattern = pattern(OFFSETS + 300);
            buf.slice()[..pattern.len()].copy_from_slice(&pattern);
            buf
        };
        let source = &source.bytes[source.start..];
        let mut dst = PageAligned::new(OFFSETS + 300 + GUARD_LEN);
        for copier in copiers() {
            for len in 0..=300 {
                for src_off in 0..OFFSETS {
                    for dst_off in 0..OFFSETS {
                        check_copy(copier, source, dst.slice(), len, src_off, dst_off)
                            .unwrap_or_else(|failure| panic!("{failure}"));
                    }
                }
            }
        }
    }

    #[test]
    fn every_implementation_zeroes_exactly_the_range() {
        let mut buf = PageAligned::new(OFFSETS + 600 + GUARD_LEN);
        for copier in copiers() {
            for len in 0..=600 {
                for off in 0..OFFSETS {
                    check_zero(copier, buf.slice(), len, off)
                        .unwrap_or_else(|failure| panic!("{failure}"));
                }
            }
        }
    }

    #[test]
    fn both_copy_directions_are_taken_by_the_offsets_tested() {
        // The small-offsets test relies on both page-aligned buffers: dst_off - src_off then
        // ranges over -63..=63, i.e. delta mod 4096 in 1..64 (backward) and 4033..=4095 plus 0
        // (forward). Check the direction rule itself at its edges.
        #[cfg(target_arch = "x86_64")]
        {
            let base = 0x10_0000usize;
            let aliases = |delta: usize| x86::forward_aliases_for_test(base, base + delta);
            assert!(!aliases(0));
            assert!(aliases(1));
            assert!(aliases(4));
            assert!(aliases(2047));
            assert!(!aliases(2048));
            assert!(!aliases(4095));
            assert!(!aliases(4096));
            assert!(aliases(4096 + 16));

            let rep_movsb_aliases =
                |delta: usize| x86::rep_movsb_aliases_for_test(base, base + delta);
            assert!(!rep_movsb_aliases(0));
            assert!(rep_movsb_aliases(4));
            assert!(rep_movsb_aliases(63));
            assert!(!rep_movsb_aliases(64));
            assert!(!rep_movsb_aliases(4092));
        }
    }

    #[test]
    fn free_functions_copy_and_zero_with_the_active_implementation() {
        let source = pattern(5000);
        let mut device = vec![GUARD; 5000 + GUARD_LEN];
        // SAFETY: `device` has 5000 writable bytes and is a different allocation from `source`.
        unsafe { copy_to_device(&source, device.as_mut_ptr()) };
        assert_eq!(&device[..5000], &source[..]);
        assert!(device[5000..].iter().all(|&b| b == GUARD));

        let mut back = vec![0u8; 4999];
        // SAFETY: `device` has 4999 readable bytes at offset 1; `back` is another allocation.
        unsafe { copy_from_device(device.as_ptr().add(1), &mut back) };
        assert_eq!(&back[..], &source[1..]);

        let mut other = vec![GUARD; 100];
        // SAFETY: 90 bytes readable at `device`, writable at `other + 3`; disjoint.
        unsafe { copy_raw(device.as_ptr(), other.as_mut_ptr().add(3), 90) };
        assert_eq!(&other[3..93], &source[..90]);
        assert!(other[..3].iter().chain(&other[93..]).all(|&b| b == GUARD));

        // SAFETY: `device` has 4000 writable bytes at offset 7.
        unsafe { zero_device(device.as_mut_ptr().add(7), 4000) };
        assert_eq!(&device[..7], &source[..7]);
        assert!(device[7..4007].iter().all(|&b| b == 0));
        assert_eq!(&device[4007..5000], &source[4007..]);
    }

    #[test]
    fn forcing_an_implementation_changes_what_the_free_functions_use() {
        let detected = Implementation::detect();
        assert!(detected.is_available());
        for forced in Implementation::available() {
            force_implementation(forced).expect("available");
            assert_eq!(implementation(), forced.name());
            assert_eq!(Copier::active().implementation(), forced);
        }
        force_implementation(detected).expect("detected implementations are available");
        assert_eq!(implementation(), detected.name());
    }

    #[test]
    fn detection_follows_the_documented_rule() {
        let detected = Implementation::detect();
        #[cfg(target_arch = "x86_64")]
        {
            let expected = if std::arch::is_x86_feature_detected!("avx") {
                Implementation::Avx
            } else if x86::has_fsrm() && x86::has_erms() {
                Implementation::RepMovsb
            } else {
                Implementation::Sse2
            };
            assert_eq!(detected, expected);
            assert!(Implementation::Sse2.is_available());
        }
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(detected, Implementation::Portable);
        assert!(Implementation::Portable.is_available());
    }

    /// The CPUID reading of FSRM agrees with the kernel's (`/proc/cpuinfo` names it `fsrm`).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn fsrm_detection_agrees_with_the_kernel() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("Linux has /proc/cpuinfo");
        let flags = cpuinfo
            .lines()
            .find(|line| line.starts_with("flags"))
            .expect("x86 /proc/cpuinfo has a flags line");
        let kernel_says = flags.split_whitespace().any(|flag| flag == "fsrm");
        assert_eq!(x86::has_fsrm(), kernel_says);
        let kernel_says_erms = flags.split_whitespace().any(|flag| flag == "erms");
        assert_eq!(x86::has_erms(), kernel_says_erms);
    }

    #[test]
    fn names_round_trip_and_bad_names_say_what_is_expected() {
        for implementation in ALL {
            assert_eq!(implementation.name().parse(), Ok(implementation));
            assert_eq!(implementation.to_string(), implementation.name());
        }
        let error = "memcpy".parse::<Implementation>().unwrap_err();
        assert_eq!(error, CopyError::UnknownName("memcpy".into()));
        assert!(error
            .to_string()
            .contains("expected avx, sse2, rep-movsb or portable"));
    }

    #[test]
    fn unavailable_implementations_are_refused() {
        for implementation in ALL {
            match Copier::new(implementation) {
                Ok(copier) => {
                    assert!(implementation.is_available());
                    assert_eq!(copier.implementation(), implementation);
                }
                Err(error) => {
                    assert!(!implementation.is_available());
                    assert_eq!(error, CopyError::Unavailable(implementation.name()));
                    assert_eq!(force_implementation(implementation), Err(error));
                }
            }
        }
    }

    /// Largest random length: 1 MiB.
    const MAX_RANDOM_LEN: usize = 1 << 20;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_lengths_up_to_a_mebibyte_copy_exactly(
            len in 0..=MAX_RANDOM_LEN,
            src_off in 0..OFFSETS,
            dst_off in 0..OFFSETS,
            page_shift in 0usize..4096,
        ) {
            let mut source = PageAligned::new(MAX_RANDOM_LEN + OFFSETS);
            let pattern = pattern(len + OFFSETS);
            source.slice()[..pattern.len()].copy_from_slice(&pattern);
            let mut dst = PageAligned::new(4096 + MAX_RANDOM_LEN + OFFSETS + GUARD_LEN);
            for copier in copiers() {
                // `page_shift` moves the destination so that every `(dst - src) mod 4096`
                // (both directions, and the aliasing window) is reachable.
                let dst_slice = &mut dst.slice()[page_shift..];
                let result = check_copy(
                    copier, &source.bytes[source.start..], dst_slice, len, src_off, dst_off,
                );
                prop_assert!(result.is_ok(), "{}", result.unwrap_err());
            }
        }

        #[test]
        fn random_lengths_up_to_a_mebibyte_zero_exactly(
            len in 0..=MAX_RANDOM_LEN,
            off in 0..OFFSETS,
        ) {
            let mut buf = PageAligned::new(MAX_RANDOM_LEN + OFFSETS + GUARD_LEN);
            for copier in copiers() {
                let result = check_zero(copier, buf.slice(), len, off);
                prop_assert!(result.is_ok(), "{}", result.unwrap_err());
            }
        }
    }
}
