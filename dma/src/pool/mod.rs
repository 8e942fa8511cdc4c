//! (being written)
pub mod buddy;
