//! The control socket (`vmm --api-socket PATH`) and its client (`vmm ctl PATH ...`): HTTP/1.1
//! over a Unix stream socket, one request per connection, the endpoints of cloud-hypervisor's
//! API so `ch-remote`-style clients and `curl --unix-socket` work:
//!
//! ```text
//! PUT /api/v1/vm.pause                                   204 | 409/500 {"error": "..."}
//! PUT /api/v1/vm.resume                                  204
//! PUT /api/v1/vm.snapshot  {"destination_url": "file:///DIR"}   204 (the VM must be paused)
//! GET /api/v1/vm.info                                    200 {"state": "Running"|"Paused"}
//! ```
//! Requests are bounded (8 KiB of headers, 64 KiB of body, 5 s to arrive); anything else gets
//! 400, 404 or 405 with a JSON error body.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 << 10;
/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the control socket can ask of a VM.
pub trait VmActions: Send + Sync {
    /// Park every vCPU (devices quiesce with them: they are served on vCPU threads or stop
    /// with their queues' notifications).
    fn pause(&self) -> Result<(), String>;
    /// Run again.
    fn resume(&self) -> Result<(), String>;
    /// Save the paused VM into `dir`.
    fn snapshot(&self, dir: &Path) -> Result<(), String>;
    /// Whether the VM is paused.
    fn paused(&self) -> bool;
}

/// Body of `vm.snapshot` (cloud-hypervisor's `VmSnapshotConfig`).
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// `file:///path/to/dir`.
    pub destination_url: String,
}

/// Body of an error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// Body of `vm.info`.
#[derive(Debug, Serialize, Deserialize)]
pub struct InfoBody {
    /// `Running` or `Paused`.
    pub state: String,
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn read_request(stream: &UnixStream) -> Result<Request, String> {
    let mut r = BufReader::new(stream.take((MAX_HEAD + MAX_BODY) as u64));
    let mut head = 0usize;
    let mut line = String::new();
    let mut next_line = |r: &mut BufReader<_>, line: &mut String| -> Result<(), String> {
        line.clear();
        let n = r
            .read_line(line)
            .map_err(|e| format!("reading the request: {e}"))?;
        head += n;
        if n == 0 || head > MAX_HEAD {
            return Err("request head truncated or over 8 KiB".into());
        }
        Ok(())
    };
    next_line(&mut r, &mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(format!("bad request line {:?}", line.trim_end()));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut length = 0usize;
    loop {
        next_line(&mut r, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad Content-Length {:?}", v.trim()))?;
            }
        }
    }
    if length > MAX_BODY {
        return Err(format!("body of {length} bytes (at most {MAX_BODY})"));
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok(Request { method, path, body })
}

fn respond(mut stream: &UnixStream, status: u16, body: Option<String>) {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Internal Server Error",
    };
    let body = body.unwrap_or_default();
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    if !body.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    if let Err(e) = stream.write_all(out.as_bytes()) {
        log::warn!("api: cannot answer: {e}");
    }
}

fn error(msg: impl Into<String>) -> Option<String> {
    serde_json::to_string(&ErrorBody { error: msg.into() }).ok()
}

/// `file:///dir` (or a plain path) -> the directory.
pub fn destination_dir(url: &str) -> Result<PathBuf, String> {
    let p = url.strip_prefix("file://").unwrap_or(url);
    if p.is_empty() || !p.starts_with('/') {
        return Err(format!("destination {url:?} is not file:///ABSOLUTE/PATH"));
    }
    Ok(PathBuf::from(p))
}

fn handle(actions: &dyn VmActions, req: &Request) -> (u16, Option<String>) {
    let put = req.method == "PUT";
    let done = |r: Result<(), String>| match r {
        Ok(()) => (204, None),
        Err(e) => (409, error(e)),
    };
    match req.path.as_str() {
        "/api/v1/vm.pause" if put => done(actions.pause()),
        "/api/v1/vm.resume" if put => done(actions.resume()),
        "/api/v1/vm.snapshot" if put => {
            let r = serde_json::from_slice::<SnapshotRequest>(&req.body)
                .map_err(|e| format!("vm.snapshot body: {e}"))
                .and_then(|s| destination_dir(&s.destination_url));
            match r {
                Ok(dir) => match actions.snapshot(&dir) {
                    Ok(()) => (204, None),
                    Err(e) => (500, error(e)),
                },
                Err(e) => (400, error(e)),
            }
        }
        "/api/v1/vm.info" if req.method == "GET" => {
            let state = if actions.paused() {
                "Paused"
            } else {
                "Running"
            };
            (
                200,
                serde_json::to_string(&InfoBody {
                    state: state.into(),
                })
                .ok(),
            )
        }
        "/api/v1/vm.pause" | "/api/v1/vm.resume" | "/api/v1/vm.snapshot" | "/api/v1/vm.info" => (
            405,
            error(format!("{} not allowed on {}", req.method, req.path)),
        ),
        p => (404, error(format!("no endpoint {p}"))),
    }
}

/// A running control socket; stops (and removes the socket) when dropped or stopped.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listen on `path` (which must not exist) and serve `actions` on a thread `vmm-api`.
    pub fn start(path: &Path, actions: Arc<dyn VmActions>) -> std::io::Result<ApiServer> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || serve(listener, &*actions, &flag))?;
        log::info!("api: listening on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stop serving and remove the socket.
    pub fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: UnixListener, actions: &dyn VmActions, stop: &std::sync::atomic::AtomicBool) {
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
                let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
                match read_request(&stream) {
                    Ok(req) => {
                        log::info!("api: {} {}", req.method, req.path);
                        let (status, body) = handle(actions, &req);
                        respond(&stream, status, body);
                    }
                    Err(e) => {
                        log::warn!("api: bad request: {e}");
                        respond(&stream, 400, error(e));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                log::warn!("api: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Send one request to the control socket at `socket`; the status and body of the answer.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut answer = String::new();
    s.take((MAX_HEAD + MAX_BODY) as u64)
        .read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad answer {answer:?}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `vmm ctl SOCKET COMMAND [ARG]`: run one command; the text to print, or the error.
pub fn ctl(args: &[String]) -> Result<String, String> {
    let usage = "usage: vmm ctl SOCKET pause|resume|info|snapshot DIR";
    let (Some(socket), Some(cmd)) = (args.first(), args.get(1)) else {
        return Err(usage.into());
    };
    let (method, path, body) = match (cmd.as_str(), args.get(2)) {
        ("pause", None) => ("PUT", "/api/v1/vm.pause", None),
        ("resume", None) => ("PUT", "/api/v1/vm.resume", None),
        ("info", None) => ("GET", "/api/v1/vm.info", None),
        ("snapshot", Some(dir)) => {
            let abs = std::path::absolute(dir).map_err(|e| format!("{dir}: {e}"))?;
            let body = serde_json::to_string(&SnapshotRequest {
                destination_url: format!("file://{}", abs.display()),
            })
            .map_err(|e| e.to_string())?;
            ("PUT", "/api/v1/vm.snapshot", Some(body))
        }
        _ => return Err(usage.into()),
    };
    let (status, answer) = request(Path::new(socket), method, path, body.as_deref())
        .map_err(|e| format!("{socket}: {e}"))?;
    match status {
        200..=299 => Ok(answer),
        _ => Err(serde_json::from_str::<ErrorBody>(&answer)
            .map(|b| b.error)
            .unwrap_or(answer)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        paused: Mutex<bool>,
        snapshots: Mutex<Vec<PathBuf>>,
    }

    impl VmActions for Fake {
        fn pause(&self) -> Result<(), String> {
            let mut p = self.paused.lock().unwrap();
            if *p {
                return Err("already paused".into());
            }
            *p = true;
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            *self.paused.lock().unwrap() = false;
            Ok(())
        }
        fn snapshot(&self, dir: &Path) -> Result<(), String> {
            self.snapshots.lock().unwrap().push(dir.to_path_buf());
            Ok(())
        }
        fn paused(&self) -> bool {
            *self.paused.lock().unwrap()
        }
    }

    #[test]
    fn the_socket_serves_the_client_and_refuses_bad_requests() {
        let path = std::env::temp_dir().join(format!("vmm-api-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let fake = Arc::new(Fake::default());
        let mut server = ApiServer::start(&path, fake.clone()).unwrap();
        let sock = path.display().to_string();
        let ctl = |a: &[&str]| {
            let mut v = vec![sock.clone()];
            v.extend(a.iter().map(|s| s.to_string()));
            super::ctl(&v)
        };
        assert_eq!(ctl(&["info"]).unwrap(), r#"{"state":"Running"}"#);
        ctl(&["pause"]).unwrap();
        assert_eq!(ctl(&["pause"]).unwrap_err(), "already paused");
        assert_eq!(ctl(&["info"]).unwrap(), r#"{"state":"Paused"}"#);
        ctl(&["snapshot", "/tmp/snap-x"]).unwrap();
        assert_eq!(
            *fake.snapshots.lock().unwrap(),
            vec![PathBuf::from("/tmp/snap-x")]
        );
        ctl(&["resume"]).unwrap();
        assert!(!fake.paused());
        assert!(ctl(&["frobnicate"]).unwrap_err().contains("usage"));
        let (s, _) = request(&path, "GET", "/api/v1/vm.pause", None).unwrap();
        assert_eq!(s, 405);
        let (s, _) = request(&path, "PUT", "/api/v1/nope", None).unwrap();
        assert_eq!(s, 404);
        let (s, b) = request(&path, "PUT", "/api/v1/vm.snapshot", Some("{}")).unwrap();
        assert_eq!(s, 400, "{b}");
        let (s, _) = request(
            &path,
            "PUT",
            "/api/v1/vm.snapshot",
            Some(r#"{"destination_url":"relative/dir"}"#),
        )
        .unwrap();
        assert_eq!(s, 400);
        // A head that never ends: refused at 8 KiB, the server keeps serving.
        let mut raw = UnixStream::connect(&path).unwrap();
        let junk = vec![b'a'; MAX_HEAD + 10];
        let _ = raw.write_all(&junk);
        let _ = raw.shutdown(std::net::Shutdown::Write);
        let mut a = String::new();
        let _ = raw.read_to_string(&mut a);
        assert!(a.starts_with("HTTP/1.1 400"), "{a}");
        assert_eq!(ctl(&["info"]).unwrap(), r#"{"state":"Running"}"#);
        server.stop();
        assert!(!path.exists());
    }
}
