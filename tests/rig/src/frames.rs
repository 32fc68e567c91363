//! Parser of the rig channel L1 writes (see guest-images/l1/init): marker lines framing each
//! scenario's console output and VMM stderr.

use std::collections::HashMap;
use std::time::Duration;

use crate::scenario::Outcome;

/// Most bytes of console or log kept per scenario.
pub(crate) const MAX_CAPTURE: usize = 16 * 1024 * 1024;

/// What a line meant, for progress reporting.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// L1 finished booting (its uptime in ms).
    L1Ready(String),
    /// Scenario `idx` started.
    Started(usize),
    /// Scenario `idx` has its outcome.
    Finished(usize),
    /// L1 ran every scenario.
    Done,
}

/// Which part of a scenario's output lines belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Serial,
    Stderr,
    L1Log,
}

/// Per-scenario data as it arrives.
#[derive(Default)]
struct Partial {
    serial: String,
    stderr: String,
    l1_log: String,
    status: Option<i32>,
    timed_out: bool,
    ms: u64,
}

/// State of the channel parser for one L1 boot running `names.len()` scenarios.
pub(crate) struct Frames {
    tag: String,
    names: Vec<String>,
    partial: HashMap<usize, Partial>,
    /// The scenario and section lines go to.
    current: Option<(usize, Section)>,
    outcomes: Vec<Option<Outcome>>,
    running: Option<usize>,
    done: bool,
}

fn push_capped(buf: &mut String, line: &str) {
    if buf.len() + line.len() < MAX_CAPTURE {
        buf.push_str(line);
        buf.push('\n');
    }
}

/// L1 prints a newline before an end marker: drop the empty line it adds.
fn drop_marker_newline(s: &mut String) {
    if s.ends_with("\n\n") || s == "\n" {
        s.pop();
    }
}

/// The value of `key=value` among the words of a marker line.
pub(crate) fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::to_string)
}

impl Frames {
    /// A parser for markers starting with `tag` (e.g. `@@RIG-<token>-`), scenarios `names`.
    pub(crate) fn new(tag: impl Into<String>, names: Vec<String>) -> Self {
        let n = names.len();
        Self {
            tag: tag.into(),
            names,
            partial: HashMap::new(),
            current: None,
            outcomes: vec![None; n],
            running: None,
            done: false,
        }
    }

    /// Feeds one line (without its newline).
    pub(crate) fn feed(&mut self, line: &str) -> Option<Event> {
        let Some(rest) = line.strip_prefix(self.tag.as_str()) else {
            if let Some((idx, section)) = self.current {
                if let Some(p) = self.partial.get_mut(&idx) {
                    let buf = match section {
                        Section::Serial => &mut p.serial,
                        Section::Stderr => &mut p.stderr,
                        Section::L1Log => &mut p.l1_log,
                    };
                    push_capped(buf, line);
                }
            }
            return None;
        };
        let mut words = rest.split_whitespace();
        let kind = words.next().unwrap_or("");
        let idx = words
            .next()
            .and_then(|w| w.parse::<usize>().ok())
            .filter(|&i| i < self.names.len());
        match (kind, idx) {
            ("L1-READY", _) => Some(Event::L1Ready(field(line, "ms").unwrap_or_default())),
            ("L1-DONE", _) => {
                self.done = true;
                self.current = None;
                Some(Event::Done)
            }
            ("BEGIN", Some(i)) => {
                self.partial.insert(i, Partial::default());
                self.current = Some((i, Section::Serial));
                self.running = Some(i);
                Some(Event::Started(i))
            }
            ("END", Some(i)) => {
                if let Some(p) = self.partial.get_mut(&i) {
                    drop_marker_newline(&mut p.serial);
                    p.status = field(line, "status").and_then(|s| s.parse().ok());
                    p.timed_out = field(line, "timedout").as_deref() == Some("1");
                    p.ms = field(line, "ms").and_then(|s| s.parse().ok()).unwrap_or(0);
                }
                self.current = None;
                self.running = None;
                None
            }
            ("STDERR-BEGIN", Some(i)) => {
                self.current = Some((i, Section::Stderr));
                None
            }
            ("STDERR-END", Some(i)) => {
                self.current = None;
                if let Some(p) = self.partial.get_mut(&i) {
                    drop_marker_newline(&mut p.stderr);
                }
                None
            }
            ("L1LOG-BEGIN", Some(i)) => {
                self.current = Some((i, Section::L1Log));
                None
            }
            ("L1LOG-END", Some(i)) => {
                self.current = None;
                let mut p = self.partial.remove(&i)?;
                drop_marker_newline(&mut p.l1_log);
                let mut o = Outcome::new(
                    self.names[i].clone(),
                    p.serial,
                    if p.timed_out { None } else { p.status },
                    p.stderr,
                    p.timed_out,
                    Duration::from_millis(p.ms),
                );
                o.l1_log = p.l1_log;
                self.outcomes[i] = Some(o);
                Some(Event::Finished(i))
            }
            _ => None,
        }
    }

    /// The scenario running now, if any.
    pub(crate) fn running(&self) -> Option<&str> {
        self.running.map(|i| self.names[i].as_str())
    }

    /// Index of the scenario running now, if any.
    pub(crate) fn running_index(&self) -> Option<usize> {
        self.running
    }

    /// What scenario `idx` printed so far (console, VMM stderr), e.g. when L1 died under it.
    pub(crate) fn partial(&self, idx: usize) -> (String, String) {
        self.partial
            .get(&idx)
            .map(|p| (p.serial.clone(), p.stderr.clone()))
            .unwrap_or_default()
    }

    /// The outcome of scenario `idx`, once finished.
    pub(crate) fn outcome(&self, idx: usize) -> Option<&Outcome> {
        self.outcomes.get(idx).and_then(Option::as_ref)
    }

    /// Names of the scenarios without an outcome.
    pub(crate) fn missing(&self) -> Vec<String> {
        self.names
            .iter()
            .zip(&self.outcomes)
            .filter(|(_, o)| o.is_none())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether L1 reported the end of the run.
    pub(crate) fn done(&self) -> bool {
        self.done
    }

    /// All outcomes, in scenario order, if every scenario has one.
    pub(crate) fn into_outcomes(self) -> Option<Vec<Outcome>> {
        self.outcomes.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "@@RIG-abc-";

    fn feed_all(f: &mut Frames, text: &str) -> Vec<Event> {
        text.lines().filter_map(|l| f.feed(l)).collect()
    }

    #[test]
    fn splits_console_and_stderr_per_scenario() {
        let mut f = Frames::new(T, vec!["a".into(), "b".into()]);
        let text = "\
boot noise
@@RIG-abc-L1-READY ms=5000
@@RIG-abc-BEGIN 000
hello
GUEST-EXIT 0

@@RIG-abc-END 000 status=0 timedout=0 ms=1500
@@RIG-abc-STDERR-BEGIN 000
warn: x

@@RIG-abc-STDERR-END 000
@@RIG-abc-L1LOG-BEGIN 000
[   12.5] kvm: vcpu0 unhandled rdmsr

@@RIG-abc-L1LOG-END 000
@@RIG-abc-BEGIN 001
no newline at end
@@RIG-abc-END 001 status=137 timedout=1 ms=30000
@@RIG-abc-STDERR-BEGIN 001

@@RIG-abc-STDERR-END 001
@@RIG-abc-L1LOG-BEGIN 001

@@RIG-abc-L1LOG-END 001
@@RIG-abc-L1-DONE ms=40000
";
        let ev = feed_all(&mut f, text);
        assert_eq!(
            ev,
            vec![
                Event::L1Ready("5000".into()),
                Event::Started(0),
                Event::Finished(0),
                Event::Started(1),
                Event::Finished(1),
                Event::Done
            ]
        );
        assert!(f.done());
        assert!(f.missing().is_empty());
        let o = f.into_outcomes().unwrap();
        assert_eq!(o[0].serial, "hello\nGUEST-EXIT 0\n");
        assert_eq!(o[0].guest_exit, Some(0));
        assert_eq!(o[0].vmm_status, Some(0));
        assert_eq!(o[0].vmm_log, "warn: x\n");
        assert_eq!(o[0].l1_log, "[   12.5] kvm: vcpu0 unhandled rdmsr\n");
        assert_eq!(o[0].duration, Duration::from_millis(1500));
        assert!(!o[0].timed_out);
        assert_eq!(o[1].serial, "no newline at end\n");
        assert!(o[1].timed_out);
        assert_eq!(o[1].vmm_status, None, "a killed VMM has no status");
        assert_eq!(o[1].vmm_log, "");
        assert_eq!(o[1].l1_log, "");
    }

    #[test]
    fn forged_markers_without_the_token_are_console_text() {
        let mut f = Frames::new(T, vec!["a".into()]);
        let text = "\
@@RIG-abc-BEGIN 000
@@RIG-END 000 status=0 timedout=0 ms=1
@@RIG-xyz-STDERR-END 000
GUEST-EXIT 3
";
        feed_all(&mut f, text);
        assert_eq!(f.running(), Some("a"));
        assert_eq!(f.missing(), vec!["a".to_string()]);
        assert!(f.outcome(0).is_none());
        assert!(!f.done());
    }

    #[test]
    fn out_of_range_or_unknown_ids_are_ignored() {
        let mut f = Frames::new(T, vec!["a".into()]);
        assert_eq!(f.feed("@@RIG-abc-BEGIN 007"), None);
        assert_eq!(f.feed("@@RIG-abc-BEGIN x"), None);
        assert_eq!(
            f.feed("@@RIG-abc-L1LOG-END 000"),
            None,
            "no BEGIN: no outcome"
        );
        assert_eq!(f.feed("@@RIG-abc-WHAT 000"), None);
        assert!(f.running().is_none());
        assert!(f.outcome(0).is_none());
    }

    #[test]
    fn capture_is_bounded() {
        let mut f = Frames::new(T, vec!["a".into()]);
        f.feed("@@RIG-abc-BEGIN 000");
        let line = "x".repeat(1 << 20);
        for _ in 0..40 {
            f.feed(&line);
        }
        f.feed("@@RIG-abc-END 000 status=0 timedout=0 ms=1");
        f.feed("@@RIG-abc-STDERR-BEGIN 000");
        f.feed("@@RIG-abc-STDERR-END 000");
        assert!(f.outcome(0).is_none(), "finished only after L1's log");
        f.feed("@@RIG-abc-L1LOG-BEGIN 000");
        f.feed("@@RIG-abc-L1LOG-END 000");
        let o = f.outcome(0).unwrap();
        assert!(o.serial.len() <= MAX_CAPTURE, "{}", o.serial.len());
        assert!(o.serial.len() >= MAX_CAPTURE - (2 << 20));
    }

    #[test]
    fn marker_fields() {
        let l = "@@RIG-abc-END 003 status=1 timedout=0 ms=1234";
        assert_eq!(field(l, "status").as_deref(), Some("1"));
        assert_eq!(field(l, "ms").as_deref(), Some("1234"));
        assert_eq!(field(l, "nope"), None);
    }
}
