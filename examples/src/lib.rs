//! Examples live in `examples/*.rs`; see `cargo run -p tidepool-examples --example nvme_identify`.
