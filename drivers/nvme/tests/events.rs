//! The driver's tracing events for a reset and a recovery. In a test binary of its own: tracing
//! caches each callsite's interest process-wide, and a scoped subscriber set on one test thread
//! can miss events whose callsites other test threads registered first.

mod common;

use std::time::Duration;

use common::*;
use tidepool_nvme::NvmeError;

/// Captures the message and fields of every tracing event on the current thread.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl tracing::Subscriber for Capture {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::always()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                let _ = write!(self.0, " {}={:?}", field.name(), value);
            }
        }
        let mut fields = Fields(event.metadata().level().to_string());
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn a_timeout_logs_the_reset_with_its_reason_and_the_recovery() {
    let capture = Capture::default();
    let rig = Rig::new();
    tracing::subscriber::with_default(capture.clone(), || {
        let mut q = rig.queue(4);
        rig.nvme.faults().drop_completions(1);
        q.submit_flush(&rig.ns, 1).unwrap();
        let (err, done) = poll_until_error(&mut q, Duration::from_secs(3));
        assert!(matches!(err, NvmeError::CommandTimeout { .. }), "{err}");
        drop((done, q));
        rig.ctrl.recover().expect("recover");
    });
    let events = capture.0.lock().unwrap().clone();
    let reset = events
        .iter()
        .find(|e| e.contains("resetting the NVMe controller"))
        .unwrap_or_else(|| panic!("no reset event in {events:?}"));
    assert!(reset.starts_with("WARN"), "{reset}");
    assert!(
        reset.contains("reason=queue 1: ") && reset.contains("timed out"),
        "{reset}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("INFO") && e.contains("recovered after a reset")),
        "{events:?}"
    );
    rig.finish();
}
