//! Workload generation: which block each I/O touches, in which order, and in which direction.
//!
//! The region `[offset, offset + size)` is cut into a *layout* of blocks:
//! - fixed `bs`: block `i` is `[offset + i*bs, offset + (i+1)*bs)` for `i < size / bs` (computed,
//!   not stored; a tail shorter than `bs` is not used);
//! - `bsrange`: the region is partitioned front to back into blocks of random length, each a multiple
//!   of the alignment (512 or the device's logical block size) in `[min, max]`; the list is stored.
//!
//! A *pass* visits every block exactly once: in order for sequential modes, or in a pseudo-random
//! permutation for random modes. The permutation is a 4-round Feistel network over the smallest
//! even power of two >= n, with cycle walking (re-apply until the value is < n): a Feistel network
//! is a bijection on its domain, and cycle walking restricts a bijection to a bijection on [0, n),
//! so each block is hit once per pass and no map of visited blocks is needed. Blocks never overlap,
//! so a verify phase can replay the same sequence and expect the exact bytes written.
//! Without `time_based` the job ends after one pass (size bytes, as fio); with it, passes repeat
//! with a fresh permutation key each pass.
//!
//! Direction for mixed modes is an independent draw per I/O with probability `rwmixread`%. Each
//! decision uses its own generator so that a verify replay (all reads) visits the same blocks.

use crate::engine::IoDirection;

/// The most blocks an explicit (`bsrange`) layout may hold (16 Mi entries, 256 MiB of memory).
pub const MAX_EXPLICIT_BLOCKS: usize = 1 << 24;

/// A small, fast, statistically decent 64-bit generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// A value uniform in `[0, bound)` (`bound > 0`), by multiply-shift (bias < 2^-64 * bound).
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A keyed bijection of `[0, n)` (see the module doc).
#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    /// A permutation of `[0, n)` chosen by `key`.
    pub fn new(n: u64, key: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut generator = SplitMix64::new(key);
        let keys = [
            generator.next_u64(),
            generator.next_u64(),
            generator.next_u64(),
            generator.next_u64(),
        ];
        Permutation { n, half_bits, keys }
    }

    /// One Feistel pass over the `2 * half_bits`-bit domain.
    fn feistel(&self, value: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let mut left = value >> self.half_bits;
        let mut right = value & mask;
        for key in self.keys {
            let next = left ^ (mix64(right ^ key) & mask);
            left = right;
            right = next;
        }
        (left << self.half_bits) | right
    }

    /// The image of `index` (`index < n`).
    pub fn at(&self, index: u64) -> u64 {
        let mut value = index;
        loop {
            value = self.feistel(value);
            if value < self.n {
                return value;
            }
        }
    }
}

/// One block of the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Byte offset on the target.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// How the region is cut into blocks.
#[derive(Debug, Clone)]
pub enum Layout {
    /// Equal blocks, computed on demand.
    Fixed {
        /// Region start.
        base: u64,
        /// Block size.
        bs: u32,
        /// Number of blocks.
        count: u64,
    },
    /// Blocks of random sizes, stored.
    Explicit(Vec<Block>),
}

/// A layout could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Too many bsrange blocks to store.
    #[error("bsrange over {size} bytes needs more than {MAX_EXPLICIT_BLOCKS} blocks: lower --size or raise the bsrange minimum")]
    TooManyBlocks {
        /// Region size.
        size: u64,
    },
    /// The region holds no block.
    #[error("the region ({size} bytes) holds no whole block: raise --size")]
    Empty {
        /// Region size.
        size: u64,
    },
}

impl Layout {
    /// Equal blocks of `bs` over `[base, base + size)`.
    pub fn fixed(base: u64, size: u64, bs: u32) -> Result<Self, WorkloadError> {
        let count = size / u64::from(bs);
        if count == 0 {
            return Err(WorkloadError::Empty { size });
        }
        Ok(Layout::Fixed { base, bs, count })
    }

    /// Blocks whose sizes are drawn from fio's `bssplit` weights (`(size, percent)` summing to
    /// 100), partitioning `[base, base + size)` front to back; a tail shorter than the chosen size
    /// is cut to the largest multiple of `align` that fits (at least the smallest size).
    pub fn split(
        base: u64,
        size: u64,
        split: &[(u64, u32)],
        align: u32,
        seed: u64,
    ) -> Result<Self, WorkloadError> {
        let mut generator = SplitMix64::new(seed ^ 0x6273_7370_6c69_7421);
        let total: u64 = split.iter().map(|(_, percent)| u64::from(*percent)).sum();
        let smallest = split.iter().map(|(bs, _)| *bs).min().unwrap_or(0);
        let align = u64::from(align);
        let mut blocks = Vec::new();
        let mut position = 0;
        while smallest > 0 && size - position >= smallest {
            if blocks.len() == MAX_EXPLICIT_BLOCKS {
                return Err(WorkloadError::TooManyBlocks { size });
            }
            let mut draw = generator.below(total.max(1));
            let mut wanted = smallest;
            for (bs, percent) in split {
                if draw < u64::from(*percent) {
                    wanted = *bs;
                    break;
                }
                draw -= u64::from(*percent);
            }
            let remaining = (size - position) / align * align;
            let len = wanted.min(remaining);
            blocks.push(Block {
                offset: base + position,
                len: len as u32,
            });
            position += len;
        }
        if blocks.is_empty() {
            return Err(WorkloadError::Empty { size });
        }
        Ok(Layout::Explicit(blocks))
    }

    /// Random-size blocks, multiples of `align` in `[min, max]`, partitioning `[base, base + size)`.
    pub fn ranged(
        base: u64,
        size: u64,
        min: u32,
        max: u32,
        align: u32,
        seed: u64,
    ) -> Result<Self, WorkloadError> {
        let mut generator = SplitMix64::new(seed ^ 0x6273_7261_6e67_6521);
        let (min, max, align) = (u64::from(min), u64::from(max), u64::from(align));
        let choices = (max - min) / align + 1;
        let mut blocks = Vec::new();
        let mut position = 0;
        while size - position >= min {
            if blocks.len() == MAX_EXPLICIT_BLOCKS {
                return Err(WorkloadError::TooManyBlocks { size });
            }
            let wanted = min + generator.below(choices) * align;
            let remaining = (size - position) / align * align;
            let len = wanted.min(remaining);
            blocks.push(Block {
                offset: base + position,
                len: len as u32,
            });
            position += len;
        }
        if blocks.is_empty() {
            return Err(WorkloadError::Empty { size });
        }
        Ok(Layout::Explicit(blocks))
    }

    /// The number of blocks.
    pub fn len(&self) -> u64 {
        match self {
            Layout::Fixed { count, .. } => *count,
            Layout::Explicit(blocks) => blocks.len() as u64,
        }
    }

    /// Whether the layout has no block (never true for a built layout).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Block `index` (`index < len()`).
    pub fn block(&self, index: u64) -> Block {
        match self {
            Layout::Fixed { base, bs, .. } => Block {
                offset: base + index * u64::from(*bs),
                len: *bs,
            },
            Layout::Explicit(blocks) => blocks[index as usize],
        }
    }
}

/// One I/O the workload asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedIo {
    /// Read or write.
    pub direction: IoDirection,
    /// Byte offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
    /// Which pass (0-based) this I/O belongs to; verify uses it as the block's generation.
    pub pass: u64,
}

/// The stream of I/Os of one job.
#[derive(Debug, Clone)]
pub struct Workload {
    layout: Layout,
    random: bool,
    read_percent: u8,
    repeat: bool,
    seed: u64,
    permutation: Option<Permutation>,
    position: u64,
    pass: u64,
    direction_rng: SplitMix64,
    /// Passes to run without `repeat` (fio's `loops`).
    loops: u64,
    /// `norandommap`: random indices drawn with replacement.
    offset_rng: Option<SplitMix64>,
    /// An iolog being replayed instead of the layout.
    log: Option<std::sync::Arc<Vec<PlannedIo>>>,
}

impl Workload {
    /// A workload over `layout`: random order or not, `read_percent`% reads, repeating passes when
    /// `repeat` (time_based), generators derived from `seed`.
    pub fn new(layout: Layout, random: bool, read_percent: u8, repeat: bool, seed: u64) -> Self {
        let permutation = random.then(|| Permutation::new(layout.len(), seed));
        Workload {
            layout,
            random,
            read_percent,
            repeat,
            seed,
            permutation,
            position: 0,
            pass: 0,
            direction_rng: SplitMix64::new(seed ^ 0x5257_4d49_5852_4541),
            loops: 1,
            offset_rng: None,
            log: None,
        }
    }

    /// Runs `loops` passes instead of one (ignored when repeating until the run time is up).
    pub fn with_loops(mut self, loops: u32) -> Self {
        self.loops = u64::from(loops.max(1));
        self
    }

    /// fio's `norandommap`: random offsets drawn independently (a block may come twice in a pass
    /// and another not at all). No effect on sequential workloads.
    pub fn without_random_map(mut self) -> Self {
        if self.random {
            self.permutation = None;
            self.offset_rng = Some(SplitMix64::new(self.seed ^ 0x6e6f_6d61_7021));
        }
        self
    }

    /// A workload that replays `ios` (a parsed iolog) `loops` times, in order.
    pub fn from_log(ios: Vec<PlannedIo>, loops: u32) -> Self {
        let mut workload = Workload::new(Layout::Explicit(Vec::new()), false, 100, false, 0);
        workload.log = Some(std::sync::Arc::new(ios));
        workload.with_loops(loops)
    }

    /// A copy of this workload from the start with every I/O turned into a read: the verify replay.
    pub fn replay_as_reads(&self) -> Self {
        let mut replay = Workload::new(self.layout.clone(), self.random, 100, false, self.seed)
            .with_loops(self.loops as u32);
        if self.offset_rng.is_some() {
            replay = replay.without_random_map();
        }
        if let Some(log) = &self.log {
            replay.log = Some(std::sync::Arc::new(
                log.iter()
                    .map(|io| PlannedIo {
                        direction: IoDirection::Read,
                        ..*io
                    })
                    .collect(),
            ));
        }
        replay
    }

    /// The number of blocks in one pass.
    pub fn blocks_per_pass(&self) -> u64 {
        self.layout.len()
    }
}

impl Iterator for Workload {
    type Item = PlannedIo;

    /// The next I/O, or `None` after one pass unless repeating.
    fn next(&mut self) -> Option<PlannedIo> {
        if let Some(log) = &self.log {
            if self.position == log.len() as u64 {
                if !self.repeat && self.pass + 1 >= self.loops {
                    return None;
                }
                self.position = 0;
                self.pass += 1;
            }
            let io = log.get(self.position as usize).copied()?;
            self.position += 1;
            return Some(PlannedIo {
                pass: self.pass,
                ..io
            });
        }
        if self.position == self.layout.len() {
            if !self.repeat && self.pass + 1 >= self.loops {
                return None;
            }
            self.position = 0;
            self.pass += 1;
            if self.random && self.offset_rng.is_none() {
                self.permutation = Some(Permutation::new(
                    self.layout.len(),
                    self.seed.wrapping_add(self.pass),
                ));
            }
        }
        let index = match (&self.permutation, &mut self.offset_rng) {
            (_, Some(generator)) => generator.below(self.layout.len()),
            (Some(permutation), None) => permutation.at(self.position),
            (None, None) => self.position,
        };
        self.position += 1;
        let block = self.layout.block(index);
        let direction = match self.read_percent {
            100 => IoDirection::Read,
            0 => IoDirection::Write,
            percent => {
                if self.direction_rng.below(100) < u64::from(percent) {
                    IoDirection::Read
                } else {
                    IoDirection::Write
                }
            }
        };
        Some(PlannedIo {
            direction,
            offset: block.offset,
            len: block.len,
            pass: self.pass,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn permutation_is_a_bijection_for_awkward_sizes() {
        for n in [1u64, 2, 3, 5, 17, 1000, 4097] {
            let permutation = Permutation::new(n, 42 + n);
            let seen: HashSet<u64> = (0..n).map(|i| permutation.at(i)).collect();
            assert_eq!(seen.len() as u64, n, "n={n}");
            assert!(seen.iter().all(|value| *value < n));
        }
    }

    #[test]
    fn permutation_is_not_the_identity() {
        let permutation = Permutation::new(1000, 7);
        let fixed_points = (0..1000).filter(|i| permutation.at(*i) == *i).count();
        assert!(
            fixed_points < 20,
            "{fixed_points} fixed points: not shuffled"
        );
    }

    #[test]
    fn ranged_layout_partitions_without_overlap() {
        let base = 1 << 20;
        let layout = Layout::ranged(base, 10 << 20, 4096, 131072, 512, 9).expect("layout");
        let mut expected_offset = base;
        for index in 0..layout.len() {
            let block = layout.block(index);
            assert_eq!(block.offset, expected_offset);
            assert_eq!(block.len % 512, 0);
            assert!(block.len as u64 <= 131072);
            assert!(block.len >= 4096 || block.offset + u64::from(block.len) == base + (10 << 20));
            expected_offset += u64::from(block.len);
        }
        assert!(expected_offset <= base + (10 << 20));
        assert!(base + (10 << 20) - expected_offset < 4096, "tail too large");
    }
}
