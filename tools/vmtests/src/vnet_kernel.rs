//! The guest kernel's side of the virtio-net VM tests: an AF_PACKET socket on the kernel-owned
//! NIC (`TIDEPOOL_VNET_KERNEL_IF`), the harness's virtio-net environment, and pktgen control.
//! Included by the `vnet_*` test binaries with `#[path]`.

#![allow(dead_code)] // each test binary uses a different subset

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The harness's virtio-net environment (tools/vm/run --virtio-net).
pub struct VnetEnv {
    /// Our vfio-bound function (iommu_platform=on), on the hub with the kernel NIC.
    pub bdf: String,
    /// A vfio-bound function without IOMMU translation (negative tests).
    pub noiommu_bdf: String,
    /// The kernel's interface name.
    pub kernel_if: String,
    /// The kernel's IPv4 address.
    pub kernel_ip: [u8; 4],
    /// The address our driver answers ARP/ICMP for.
    pub our_ip: [u8; 4],
    /// The first vfio NVMe function (a "not virtio-net" BDF).
    pub nvme_bdf: String,
}

fn ip4(s: &str) -> Option<[u8; 4]> {
    let v: Vec<u8> = s.split('.').filter_map(|p| p.parse().ok()).collect();
    v.try_into().ok()
}

impl VnetEnv {
    /// Reads the environment; a clear error when the VM has no virtio-net devices.
    pub fn from_env() -> Result<VnetEnv, String> {
        let get = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let need = |n: &str| {
            get(n).ok_or_else(|| format!("{n} is not set: run with `tools/vm/run --virtio-net`"))
        };
        Ok(VnetEnv {
            bdf: need("TIDEPOOL_VNET_BDF")?,
            noiommu_bdf: need("TIDEPOOL_VNET_NOIOMMU_BDF")?,
            kernel_if: need("TIDEPOOL_VNET_KERNEL_IF")?,
            kernel_ip: ip4(&need("TIDEPOOL_VNET_KERNEL_IP")?)
                .ok_or("bad TIDEPOOL_VNET_KERNEL_IP")?,
            our_ip: ip4(&need("TIDEPOOL_VNET_IP")?).ok_or("bad TIDEPOOL_VNET_IP")?,
            nvme_bdf: need("TIDEPOOL_NVME_BDF")?,
        })
    }

    /// The kernel NIC's MAC, from sysfs.
    pub fn kernel_mac(&self) -> Result<[u8; 6], String> {
        let p = format!("/sys/class/net/{}/address", self.kernel_if);
        let s = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
        let v: Vec<u8> = s
            .trim()
            .split(':')
            .filter_map(|x| u8::from_str_radix(x, 16).ok())
            .collect();
        v.try_into().map_err(|_| format!("{p}: not a MAC: {s}"))
    }

    /// An interface counter (`rx_packets`, `tx_packets`, `rx_dropped`, ...).
    pub fn kernel_counter(&self, name: &str) -> u64 {
        let p = format!("/sys/class/net/{}/statistics/{name}", self.kernel_if);
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// An AF_PACKET raw socket bound to one interface and one ethertype.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

impl PacketSocket {
    /// Opens a socket on `ifname` receiving frames of `ethertype` (host order), with a large
    /// receive buffer and a receive timeout.
    pub fn open(ifname: &str, ethertype: u16, timeout: Duration) -> Result<PacketSocket, String> {
        let proto = ethertype.to_be() as i32;
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if raw < 0 {
            return Err(os_err("socket(AF_PACKET)"));
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(ifname).map_err(|_| "bad interface name".to_string())?;
        // SAFETY: name is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(os_err(&format!("if_nametoindex({ifname})")));
        }
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(os_err("bind(AF_PACKET)"));
        }
        let s = PacketSocket { fd, ifindex };
        s.setsockopt(libc::SO_RCVBUFFORCE, &(32i32 << 20))?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        s.setsockopt(libc::SO_RCVTIMEO, &tv)?;
        Ok(s)
    }

    fn setsockopt<T>(&self, opt: i32, v: &T) -> Result<(), String> {
        // SAFETY: v points to a valid T of the size passed.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (v as *const T).cast(),
                std::mem::size_of::<T>() as u32,
            )
        };
        if r < 0 {
            return Err(os_err("setsockopt"));
        }
        Ok(())
    }

    /// Receives one frame into `buf`; None on timeout.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, String> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(format!("recv: {e}")),
            };
        }
        Ok(Some(n as usize))
    }

    /// Sends one complete Ethernet frame out of the interface. Retries on ENOBUFS.
    pub fn send(&self, frame: &[u8]) -> Result<(), String> {
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        loop {
            // SAFETY: frame and sll are valid for the sizes passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n == frame.len() as isize {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if n < 0 && e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::yield_now();
                continue;
            }
            return Err(format!("sendto: {e} ({n} of {} B)", frame.len()));
        }
    }

    /// PACKET_STATISTICS: (packets, drops) since the last call.
    pub fn stats(&self) -> (u32, u32) {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as u32;
        // SAFETY: st and len are valid for the sizes passed.
        unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        (st.tp_packets, st.tp_drops)
    }
}

/// Writes one pktgen command (with the trailing newline pktgen needs).
pub fn pktgen(file: &str, cmd: &str) -> Result<(), String> {
    std::fs::write(file, format!("{cmd}\n")).map_err(|e| format!("pktgen {file} <- {cmd:?}: {e}"))
}
