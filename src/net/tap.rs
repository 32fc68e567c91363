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
