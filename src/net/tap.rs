//! A Linux TAP interface as a virtio-net backend: frames the guest sends are written to the
//! TAP file descriptor (from the transmitting thread); a reader thread delivers the frames the
//! host sends to the port's [`FrameSink`]. No virtio-net header crosses the TAP (no
//! IFF_VNET_HDR: the device offers no offloads, so the header would always be empty).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{FrameSink, NetBackend};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Largest frame read from the TAP in one go (bigger ones are truncated by the kernel and
/// dropped by the device).
const READ_BYTES: usize = 65_550;

/// `struct ifreq` as TUNSETIFF reads it (name, flags, padding to 40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    pad: [u8; 22],
}

/// An open TAP interface with its reader thread.
pub struct Tap {
    file: Arc<File>,
    name: String,
    tx_errors: Arc<AtomicU64>,
    reader: Option<(JoinHandle<()>, EventFd)>,
}

impl Tap {
    /// Open (or create) the TAP interface `name` and start delivering what it receives to
    /// `sink`. Needs CAP_NET_ADMIN (or a persistent TAP owned by the caller).
    pub fn open(name: &str, sink: Arc<dyn FrameSink>) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= 16 || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name '{name}' (1 to 15 bytes)"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (40 bytes,
        // repr(C)), and the fd is a tun device we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let actual = req.name.iter().take_while(|&&b| b != 0).count();
        let name = String::from_utf8_lossy(&req.name[..actual]).into_owned();
        let file = Arc::new(file);
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let f2 = file.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || reader_loop(&f2, &stop2, &*sink))?;
        Ok(Tap {
            file,
            name,
            tx_errors: Arc::new(AtomicU64::new(0)),
            reader: Some((thread, stop)),
        })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Frames that could not be written to the TAP (interface down, queue full).
    pub fn tx_errors(&self) -> u64 {
        self.tx_errors.load(Ordering::Relaxed)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some((thread, stop)) = self.reader.take() {
            let _ = stop.write(1);
            if thread.join().is_err() {
                log::error!("tap {}: reader thread panicked", self.name);
            }
        }
    }
}

impl NetBackend for Tap {
    fn transmit(&self, frame: &[u8]) {
        if let Err(e) = (&*self.file).write(frame) {
            if self.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!(
                    "tap {}: write: {e} (further errors counted only)",
                    self.name
                );
            }
        }
    }
}

fn reader_loop(file: &File, stop: &EventFd, sink: &dyn FrameSink) {
    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::TapReader) {
        log::error!("tap reader: {}", crate::report::Chain(&e));
        return;
    }
    let mut buf = vec![0u8; READ_BYTES];
    let mut fds = [
        libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("tap reader: poll: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            log::error!("tap reader: interface gone");
            return;
        }
        loop {
            match (&*file).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    sink.deliver(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("tap reader: read: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Delivery;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental

    struct Collect(Mutex<Vec<Vec<u8>>>);
    impl FrameSink for Collect {
        fn deliver(&self, frame: &[u8]) -> Delivery {
            self.0.lock().unwrap().push(frame.to_vec());
            Delivery::Delivered
        }
    }

    fn ifindex(name: &str) -> u32 {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: a valid NUL-terminated string.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    }

    /// Bring `name` up (SIOCSIFFLAGS with IFF_UP).
    fn set_up(name: &str) {
        // SAFETY: plain socket creation.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(s >= 0);
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `req` is a 40-byte struct ifreq; flags live at offset 16.
        unsafe {
            assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, req.as_mut_ptr()), 0);
            let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
            req[16..18].copy_from_slice(&flags.to_ne_bytes());
            assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, req.as_mut_ptr()), 0);
            libc::close(s);
        }
    }

    /// A packet socket on interface `idx` for our ethertype.
    fn packet_socket(idx: u32) -> i32 {
        // SAFETY: socket/bind with a zeroed, filled-in sockaddr_ll.
        unsafe {
            let s = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(ETHERTYPE.to_be()),
            );
            assert!(s >= 0, "packet socket: {}", io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETHERTYPE.to_be();
            sll.sll_ifindex = idx as i32;
            let r = libc::bind(
                s,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0);
            s
        }
    }

    fn frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, tag]);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend((0..60u8).map(|i| i ^ tag));
        f
    }

    /// Both directions through a real TAP (needs CAP_NET_ADMIN, as the VMM's tap backend does).
    #[test]
    fn frames_cross_a_real_tap_both_ways() {
        let sink = Arc::new(Collect(Mutex::new(Vec::new())));
        let tap = Tap::open("vmmtest%d", sink.clone()).expect("open a tap (run as root)");
        let name = tap.name().to_string();
        assert!(name.starts_with("vmmtest"), "{name}");
        set_up(&name);
        let sock = packet_socket(ifindex(&name));
        // Device -> host: what the guest transmits comes out of the interface.
        let out = frame(1);
        tap.transmit(&out);
        let mut buf = [0u8; 2048];
        let start = Instant::now();
        let got = loop {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                break buf[..n as usize].to_vec();
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "frame never reached the host"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(got, out);
        // Host -> device: a frame sent on the interface reaches the sink via the reader thread.
        let inb = frame(2);
        // SAFETY: sending a buffer we own on a bound packet socket.
        let n = unsafe { libc::send(sock, inb.as_ptr().cast(), inb.len(), 0) };
        assert_eq!(n, inb.len() as isize);
        let start = Instant::now();
        while !sink.0.lock().unwrap().contains(&inb) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "frame never reached the sink"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(tap.tx_errors(), 0);
        // SAFETY: closing our socket.
        unsafe { libc::close(sock) };
        drop(tap); // joins the reader thread
        assert_eq!(
            ifindex(&name),
            0,
            "a non-persistent tap disappears with its fd"
        );
        assert!(Tap::open("", sink.clone()).is_err());
        assert!(Tap::open("name-too-long-for-ifr", sink).is_err());
    }
}
