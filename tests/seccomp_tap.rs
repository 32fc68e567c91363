//! A TAP reader thread under its seccomp filter (`--seccomp on`): frames the host sends on the
//! interface still reach the port's sink. A forbidden call in the reader would end this test
//! process with status 159 (the VMM's SIGSYS handler). Skipped without /dev/net/tun access.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::net::{Delivery, FrameSink, Tap};
use vmm::seccomp::{self, SeccompMode};

#[derive(Default)]
struct Frames(Mutex<Vec<Vec<u8>>>);

impl FrameSink for Frames {
    fn deliver(&self, frame: &[u8]) -> Delivery {
        self.0.lock().unwrap().push(frame.to_vec());
        Delivery::Delivered
    }
}

/// Bring `name` up (SIOCSIFFLAGS |= IFF_UP).
fn set_up(name: &str) -> std::io::Result<()> {
    // SAFETY: test-only ioctls on a fresh datagram socket with a zeroed, named ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = b as libc::c_char;
        }
        let mut r = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req);
        if r == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(s, libc::SIOCSIFFLAGS, &req);
        }
        let e = std::io::Error::last_os_error();
        libc::close(s);
        if r != 0 {
            return Err(e);
        }
    }
    Ok(())
}

/// Send `frame` out of interface `name` with a packet socket (it arrives on the TAP fd).
fn send(name: &str, frame: &[u8]) -> std::io::Result<()> {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: test-only: a packet socket and a sendto with a filled sockaddr_ll.
    unsafe {
        let index = libc::if_nametoindex(cname.as_ptr());
        let s = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if index == 0 || s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let r = libc::sendto(
            s,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let e = std::io::Error::last_os_error();
        libc::close(s);
        if r < 0 {
            return Err(e);
        }
    }
    Ok(())
}

#[test]
fn tap_reader_delivers_frames_under_its_filter() {
    seccomp::set_mode(SeccompMode::On);
    let sink = Arc::new(Frames::default());
    let name = format!("vmmsc{}", std::process::id() % 100_000);
    let tap = match Tap::open(&name, sink.clone()) {
        Ok(t) => t,
        Err(e) => {
            vmm::skip::skipped(
                "seccomp_tap::tap_reader_delivers_frames_under_its_filter",
                &format!("cannot open a TAP ({e})"),
            );
            return;
        }
    };
    set_up(tap.name()).expect("interface up");
    // A broadcast frame with an unused EtherType and a per-run payload.
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0x5e, 0xc0, 0x01]);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(format!("seccomp-tap-{}", std::process::id()).as_bytes());
    frame.resize(60, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        send(tap.name(), &frame).expect("send on the TAP interface");
        std::thread::sleep(Duration::from_millis(50));
        seen = sink.0.lock().unwrap().iter().any(|f| f[..] == frame[..]);
    }
    assert!(seen, "the reader delivered {:?}", sink.0.lock().unwrap());
    // The reader stops and exits under its filter too.
    drop(tap);
}
