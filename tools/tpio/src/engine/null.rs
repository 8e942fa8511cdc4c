//! `ioengine=null`: completes every request at once without moving a byte.
//!
//! It exercises the harness (workload generation, bookkeeping, statistics, output) with no device
//! in the way, like fio's null engine. Its capacity is exactly the job's region end.

use super::region::SlotRegion;
use super::{Engine, EngineError, Geometry, IoCompletion, IoRequest};
use crate::options::{JobSpec, SECTOR};

/// The null engine's state: queued and committed requests awaiting their instant completion.
#[derive(Debug)]
pub struct NullEngine {
    geometry: Geometry,
    region: Option<SlotRegion>,
    queued: Vec<IoRequest>,
    committed: Vec<IoRequest>,
}

impl NullEngine {
    /// A null target as large as the job's region (`offset + size`).
    pub fn new(spec: &JobSpec) -> Self {
        let capacity = spec.offset.saturating_add(spec.size.unwrap_or(0));
        NullEngine {
            geometry: Geometry {
                capacity,
                logical_block_size: SECTOR as u32,
            },
            region: None,
            queued: Vec::new(),
            committed: Vec::new(),
        }
    }
}

impl Engine for NullEngine {
    fn name(&self) -> &'static str {
        "null"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Allocates real slot memory so that verify code paths run against it.
    fn prepare(&mut self, slots: u32, slot_bytes: u32) -> Result<(), EngineError> {
        self.region = Some(SlotRegion::new(slots, slot_bytes)?);
        Ok(())
    }

    /// Completions are instant, so a slot is never in flight between calls.
    fn fill_slot(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError> {
        self.region
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("fill_slot before prepare".into()))?
            .fill(slot, data)
    }

    fn read_slot(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
        self.region
            .as_ref()
            .ok_or_else(|| EngineError::Misuse("read_slot before prepare".into()))?
            .read(slot, out)
    }

    fn queue(&mut self, request: IoRequest) -> Result<(), EngineError> {
        let region = self
            .region
            .as_ref()
            .ok_or_else(|| EngineError::Misuse("queue before prepare".into()))?;
        if request.slot >= region.slots() || request.len as usize > region.slot_bytes() {
            return Err(EngineError::Misuse(format!("bad request {request:?}")));
        }
        self.queued.push(request);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        self.committed.append(&mut self.queued);
        Ok(())
    }

    fn reap(&mut self, _min: usize, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        out.extend(self.committed.drain(..).map(|request| IoCompletion {
            slot: request.slot,
            result: Ok(request.len),
        }));
        Ok(())
    }

    fn close(&mut self) -> Result<(), EngineError> {
        self.queued.clear();
        self.committed.clear();
        self.region = None;
        Ok(())
    }
}
