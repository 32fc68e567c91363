//! Writer for "newc" cpio archives, the format the Linux initramfs unpacker reads.
//!
//! Archives written here are padded to a multiple of 512 bytes so they can be appended to another
//! padded archive (compressed or not) and still start 4-byte aligned, as the kernel requires.

use std::collections::BTreeSet;

/// One regular file to put in an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioFile {
    /// Absolute path inside the archive, e.g. `/rig/scenario.sh`.
    pub path: String,
    /// Unix permission bits (e.g. 0o755).
    pub mode: u32,
    /// File contents.
    pub data: Vec<u8>,
}

impl CpioFile {
    /// A file with the given path, permission bits and contents.
    pub fn new(path: impl Into<String>, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        Self {
            path: path.into(),
            mode,
            data: data.into(),
        }
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// Builds an archive holding `files` and every parent directory they need (mode 0755), owned by
/// root, ending with the trailer, padded with zeros to a multiple of 512 bytes.
pub fn archive(files: &[CpioFile]) -> Vec<u8> {
    let mut dirs = BTreeSet::new();
    for f in files {
        let rel = f.path.trim_start_matches('/');
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            dirs.insert(acc.clone());
        }
    }
    let mut out = Vec::new();
    let mut ino = 1u32;
    for d in &dirs {
        push_entry(&mut out, ino, d, S_IFDIR | 0o755, 2, &[]);
        ino += 1;
    }
    for f in files {
        let rel = f.path.trim_start_matches('/');
        push_entry(&mut out, ino, rel, S_IFREG | (f.mode & 0o7777), 1, &f.data);
        ino += 1;
    }
    push_entry(&mut out, 0, "TRAILER!!!", 0, 1, &[]);
    pad_to(&mut out, 512);
    out
}

fn pad_to(out: &mut Vec<u8>, align: usize) {
    let pad = (align - out.len() % align) % align;
    out.resize(out.len() + pad, 0);
}

fn push_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, nlink: u32, data: &[u8]) {
    let namesize = name.len() + 1;
    let fields: [u64; 13] = [
        u64::from(ino),
        u64::from(mode),
        0, // uid
        0, // gid
        u64::from(nlink),
        0, // mtime
        data.len() as u64,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        namesize as u64,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for v in fields {
        out.extend_from_slice(format!("{:08x}", v & 0xffff_ffff).as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad_to(out, 4);
    out.extend_from_slice(data);
    pad_to(out, 4);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal newc reader for the tests: (name, mode, data) per entry, trailer excluded.
    fn parse(mut buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let total = buf.len();
        loop {
            assert_eq!(&buf[..6], b"070701", "bad magic at {}", total - buf.len());
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + i * 8..6 + i * 8 + 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let mode = field(1) as u32;
            let filesize = field(6);
            let namesize = field(11);
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(buf[110 + namesize - 1], 0);
            let data_start = (110 + namesize).div_ceil(4) * 4;
            let data = buf[data_start..data_start + filesize].to_vec();
            let next = (data_start + filesize).div_ceil(4) * 4;
            buf = &buf[next..];
            if name == "TRAILER!!!" {
                assert!(buf.iter().all(|&b| b == 0), "junk after trailer");
                return entries;
            }
            entries.push((name, mode, data));
        }
    }

    #[test]
    fn round_trips_files_and_creates_parents() {
        let files = vec![
            CpioFile::new("/rig/scenario.sh", 0o755, b"echo hi\n".to_vec()),
            CpioFile::new("/rig/data/blob", 0o644, vec![7u8; 1001]),
            CpioFile::new("top", 0o600, Vec::new()),
        ];
        let a = archive(&files);
        assert_eq!(a.len() % 512, 0);
        let e = parse(&a);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            ["rig", "rig/data", "rig/scenario.sh", "rig/data/blob", "top"]
        );
        assert_eq!(e[0].1, S_IFDIR | 0o755);
        assert_eq!(e[2].1, S_IFREG | 0o755);
        assert_eq!(e[2].2, b"echo hi\n");
        assert_eq!(e[3].2, vec![7u8; 1001]);
        assert_eq!(e[4].1, S_IFREG | 0o600);
        assert!(e[4].2.is_empty());
    }

    #[test]
    fn empty_archive_is_just_a_trailer() {
        let a = archive(&[]);
        assert_eq!(a.len(), 512);
        assert!(parse(&a).is_empty());
    }
}
