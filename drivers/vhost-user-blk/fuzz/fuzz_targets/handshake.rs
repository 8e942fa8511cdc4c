//! Fuzz target: the whole vhost-user handshake (`Connection::connect`) against a backend whose
//! replies are fuzzer-written bytes. This drives the control channel's reply parser
//! (`control::exchange`: header checks, size limits, REPLY_ACK codes) and every decoder of
//! backend-written bytes in `connection.rs` (feature words, queue and slot counts, GET_CONFIG's
//! offset/size header and config space) through the real socket path, unmodified.
//!
//! A server thread plays the backend: it accepts the frontend's connection, writes the whole
//! scripted byte stream, and shuts its write side, so that wherever the script runs out the
//! frontend sees end-of-file at once rather than waiting for its timeout. The script is built
//! from the input: per expected reply, either a well-formed header with a payload biased towards
//! acceptable values, or arbitrary header fields; then it may be cut short or given trailing
//! bytes.
//!
//! The contract is checked against an independent model of the handshake that reads the same
//! bytes: the exact outcome (which error variant, with which request, code or offered feature
//! word), and for a successful connection every negotiated value (features, protocol features,
//! queue and slot counts, config space). A timeout or an error of another kind fails the run.

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidepool_vhost_user_blk::protocol::{
    blk, features, protocol_features, BlkConfig, Header, Request, FLAG_REPLY, HEADER_LEN,
    MAX_REPLY_PAYLOAD, VERSION,
};
use tidepool_vhost_user_blk::{ConnectOptions, Connection, Error};

/// The replies the frontend awaits, in order, with the payload size each expects and whether
/// it is a REPLY_ACK. (SET_PROTOCOL_FEATURES, between the second and third, gets no reply.)
const REPLIES: [(Request, usize, bool); 7] = [
    (Request::GetFeatures, 8, false),
    (Request::GetProtocolFeatures, 8, false),
    (Request::GetQueueNum, 8, false),
    (Request::GetMaxMemSlots, 8, false),
    (Request::SetOwner, 8, true),
    (Request::SetFeatures, 8, true),
    (Request::GetConfig, 12 + blk::CONFIG_LEN, false),
];

/// The fake backend: scripts go in, the accepted socket comes back (kept open until the
/// frontend is done, so the frontend's sends never fail).
struct Backend {
    path: PathBuf,
    scripts: Sender<Vec<u8>>,
    peers: Receiver<UnixStream>,
}

fn backend() -> &'static Mutex<Backend> {
    static BACKEND: OnceLock<Mutex<Backend>> = OnceLock::new();
    BACKEND.get_or_init(|| {
        // libFuzzer's C `main` leaves SIGPIPE at its default (kill): a write to a frontend
        // that already hung up must be an EPIPE error instead.
        // SAFETY: setting a signal's disposition to "ignore" runs no handler code.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let path =
            std::env::temp_dir().join(format!("tidepool-fuzz-vhost-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind the fake backend's socket");
        let (scripts, script_rx) = channel::<Vec<u8>>();
        let (peer_tx, peers) = channel();
        std::thread::spawn(move || {
            for script in script_rx {
                let (mut peer, _) = listener.accept().expect("accept the frontend");
                // The frontend may hang up early after a bad reply; a short write is fine.
                let _ = peer.write_all(&script);
                let _ = peer.shutdown(std::net::Shutdown::Write);
                if peer_tx.send(peer).is_err() {
                    return;
                }
            }
        });
        Mutex::new(Backend {
            path,
            scripts,
            peers,
        })
    })
}

/// The outcome the model predicts.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Connected {
        features: u64,
        protocol_features: u64,
        max_queues: u16,
        max_mem_slots: u64,
        config: BlkConfig,
    },
    Protocol,
    Disconnected,
    Rejected {
        request: &'static str,
        code: u64,
    },
    MissingFeature {
        offered: u64,
    },
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// The model of one awaited reply: its payload, or how the frontend must fail.
fn model_reply<'a>(
    s: &'a [u8],
    pos: &mut usize,
    (request, want, ack): (Request, usize, bool),
) -> std::result::Result<&'a [u8], Outcome> {
    let Some(h) = s.get(*pos..*pos + HEADER_LEN) else {
        return Err(Outcome::Disconnected);
    };
    *pos += HEADER_LEN;
    let h = Header::decode(h.try_into().expect("12 bytes"));
    if h.request != request as u32 || h.flags & FLAG_REPLY == 0 {
        return Err(Outcome::Protocol);
    }
    let size = h.size as usize;
    if size > MAX_REPLY_PAYLOAD {
        return Err(Outcome::Protocol);
    }
    let Some(body) = s.get(*pos..*pos + size) else {
        return Err(Outcome::Disconnected);
    };
    *pos += size;
    if size != want {
        return Err(Outcome::Protocol);
    }
    if ack && le64(body) != 0 {
        return Err(Outcome::Rejected {
            request: request.name(),
            code: le64(body),
        });
    }
    Ok(body)
}

/// The model of the whole handshake over the scripted stream `s`.
fn model(s: &[u8]) -> Outcome {
    match model_steps(s) {
        Ok(o) | Err(o) => o,
    }
}

/// The handshake's steps in order; `Err` is where and how the frontend must stop.
fn model_steps(s: &[u8]) -> std::result::Result<Outcome, Outcome> {
    let mut pos = 0;
    let offered = le64(model_reply(s, &mut pos, REPLIES[0])?);
    if offered & features::VERSION_1 == 0 || offered & features::PROTOCOL_FEATURES == 0 {
        return Err(Outcome::MissingFeature { offered });
    }
    let proto = le64(model_reply(s, &mut pos, REPLIES[1])?);
    if proto & protocol_features::REQUIRED != protocol_features::REQUIRED {
        return Err(Outcome::MissingFeature { offered: proto });
    }
    let queues = le64(model_reply(s, &mut pos, REPLIES[2])?);
    let slots = le64(model_reply(s, &mut pos, REPLIES[3])?);
    model_reply(s, &mut pos, REPLIES[4])?;
    model_reply(s, &mut pos, REPLIES[5])?;
    let cfg = model_reply(s, &mut pos, REPLIES[6])?;
    if le32(&cfg[0..4]) != 0 || le32(&cfg[4..8]) as usize != blk::CONFIG_LEN {
        return Err(Outcome::Protocol);
    }
    let c = &cfg[12..];
    let config = BlkConfig {
        capacity_sectors: le64(&c[0..]),
        size_max: le32(&c[8..]),
        seg_max: le32(&c[12..]),
        blk_size: le32(&c[20..]),
        num_queues: u16::from_le_bytes([c[34], c[35]]),
        max_discard_sectors: le32(&c[36..]),
        max_write_zeroes_sectors: le32(&c[48..]),
    };
    if config.capacity_sectors == 0 {
        return Err(Outcome::Protocol);
    }
    Ok(Outcome::Connected {
        features: offered & features::WANTED,
        protocol_features: protocol_features::REQUIRED,
        max_queues: queues.clamp(1, u64::from(u16::MAX)) as u16,
        max_mem_slots: slots,
        config,
    })
}

/// Builds the backend's byte stream from the input.
fn script(mut u: Unstructured<'_>) -> Result<Vec<u8>> {
    let mut s = Vec::new();
    for (i, &(request, want, ack)) in REPLIES.iter().enumerate() {
        if u.is_empty() {
            break;
        }
        let well_formed = u.ratio(15u8, 16)?;
        let header = if well_formed {
            Header {
                request: request as u32,
                flags: VERSION | FLAG_REPLY,
                size: want as u32,
            }
        } else {
            Header {
                request: if u.arbitrary()? {
                    request as u32
                } else {
                    u.int_in_range(0..=40)?
                },
                flags: u.arbitrary()?,
                size: if u.arbitrary()? {
                    u.int_in_range(0..=300)?
                } else {
                    u.arbitrary()?
                },
            }
        };
        s.extend_from_slice(&header.encode());
        let mut body: Vec<u8> = (0..want).map(|_| u.arbitrary()).collect::<Result<_>>()?;
        if well_formed && u.ratio(7u8, 8)? {
            // Bias towards values the frontend accepts so later steps get exercised.
            match i {
                0 => {
                    let v = le64(&body) | features::VERSION_1 | features::PROTOCOL_FEATURES;
                    body[..8].copy_from_slice(&v.to_le_bytes());
                }
                1 => {
                    let v = le64(&body) | protocol_features::REQUIRED;
                    body[..8].copy_from_slice(&v.to_le_bytes());
                }
                _ if ack => body.fill(0),
                6 => {
                    body[..4].copy_from_slice(&0u32.to_le_bytes());
                    body[4..8].copy_from_slice(&(blk::CONFIG_LEN as u32).to_le_bytes());
                }
                _ => {}
            }
        }
        if !well_formed {
            let n = (header.size as usize).min(want + 8);
            body.resize(n, 0);
        }
        s.extend_from_slice(&body);
    }
    if u.ratio(1u8, 8)? && !s.is_empty() {
        let cut = u.int_in_range(0..=s.len() - 1)?;
        s.truncate(cut);
    }
    s.extend_from_slice(u.take_rest());
    Ok(s)
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = script(Unstructured::new(data)) else {
        return;
    };
    let want = model(&s);
    let backend = backend().lock().unwrap_or_else(|p| p.into_inner());
    backend.scripts.send(s).expect("fake backend alive");
    let opts = ConnectOptions {
        control_timeout: Duration::from_secs(5),
    };
    let got = Connection::connect(&backend.path, &opts);
    let peer = backend.peers.recv().expect("fake backend alive");
    let got = match got {
        Ok(c) => {
            assert!(!c.is_closed());
            assert_eq!(
                c.capacity_bytes(),
                c.config.capacity_sectors.saturating_mul(512)
            );
            Outcome::Connected {
                features: c.features,
                protocol_features: c.protocol_features,
                max_queues: c.max_queues,
                max_mem_slots: c.max_mem_slots,
                config: c.config,
            }
        }
        Err(Error::Protocol(_)) => Outcome::Protocol,
        Err(Error::Disconnected(_)) => Outcome::Disconnected,
        Err(Error::Rejected { request, code }) => Outcome::Rejected { request, code },
        Err(Error::MissingFeature { offered, .. }) => Outcome::MissingFeature { offered },
        Err(e) => panic!("handshake failed with an unexpected error: {e}"),
    };
    drop(peer);
    assert_eq!(got, want);
});
