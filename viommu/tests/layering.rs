//! The crate's module layering, checked on its source: the engine (`src/engine/`) knows nothing
//! of any front end, and no module imports a module that imports it back.
//!
//! Every `crate::<path>` (in `use` trees too) and `super::<module>` reference outside comments is
//! resolved to a node: a top-level module (`domain`, `vtd`, ...), or one submodule of `engine` or
//! `virtio` (`engine::table`, `virtio::spec`, ...). The edges are printed (`--nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One source file: its module path (`["engine", "host", "vfio"]`) and its text.
struct Source {
    file: PathBuf,
    module: Vec<String>,
    text: String,
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<Source>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, root, out);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let rel = path.strip_prefix(root).expect("under src");
        let mut module: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let last = module.pop().expect("file name");
        let stem = last.trim_end_matches(".rs");
        if stem != "lib" && stem != "mod" {
            module.push(stem.to_string());
        }
        let text = fs::read_to_string(&path).expect("read source");
        out.push(Source {
            file: path,
            module,
            text,
        });
    }
}

/// `text` without `//` comments (doc links are not dependencies) and string literals.
fn code_only(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = '\0';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = c;
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path that follows `prefix` (`crate::` or `super::`), `use` groups expanded:
/// `crate::{a::b, c}` gives `a::b` and `c`.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(pos) = rest.find(prefix) {
        let before = rest[..pos].chars().next_back();
        rest = &rest[pos + prefix.len()..];
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        parse_tree(rest, Vec::new(), &mut out);
    }
    out
}

/// Parse one path (or `{...}` group) at the start of `s`, prefixed with `base`.
fn parse_tree(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let s = s.trim_start();
    if let Some(inner) = s.strip_prefix('{') {
        // Split the group at top-level commas up to its closing brace.
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    parse_tree(&inner[start..i], base.clone(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parse_tree(&inner[start..i], base.clone(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let ident: String = s.chars().take_while(|&c| is_ident(c)).collect();
    if ident.is_empty() {
        if !base.is_empty() {
            out.push(base);
        }
        return;
    }
    let mut path = base;
    path.push(ident.clone());
    let after = &s[ident.len()..];
    match after.trim_start().strip_prefix("::") {
        Some(next) => parse_tree(next, path, out),
        None => out.push(path),
    }
}

/// The layering node of an absolute module path: `engine::<sub>` / `virtio::<sub>` when `sub`
/// is a module of that directory, else the top-level module.
fn node(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<String> {
    let top = path.first()?;
    if !modules.contains(&vec![top.clone()]) {
        return None; // a crate-root item (re-export)
    }
    if top == "engine" || top == "virtio" {
        if let Some(sub) = path.get(1) {
            if modules.contains(&vec![top.clone(), sub.clone()]) {
                return Some(format!("{top}::{sub}"));
            }
        }
    }
    Some(top.clone())
}

struct Graph {
    /// `from -> {to}` with the files giving each edge.
    edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// Crate-root items referenced from inside a module (`crate::Status`): they hide the edge.
    root_items: Vec<String>,
    sources: Vec<Source>,
}

fn graph() -> Graph {
    // `LAYERING_SRC` checks another tree (e.g. an older checkout's `viommu/src`).
    let root = std::env::var_os("LAYERING_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut sources = Vec::new();
    collect(&root, &root, &mut sources);
    // A file included with `#[path = "x_tests.rs"]` belongs to the including module.
    let included: Vec<(PathBuf, Vec<String>)> = sources
        .iter()
        .flat_map(|s| {
            let dir = s.file.parent().expect("parent").to_path_buf();
            s.text
                .match_indices("#[path = \"")
                .filter_map(move |(i, m)| {
                    let rest = &s.text[i + m.len()..];
                    let name = &rest[..rest.find('"')?];
                    Some((dir.join(name), s.module.clone()))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for (file, module) in included {
        if let Some(s) = sources.iter_mut().find(|s| s.file == file) {
            s.module = module;
        }
    }
    assert!(
        sources.iter().any(|s| s.module.is_empty()),
        "source tree not found under {}",
        root.display()
    );
    let modules: BTreeSet<Vec<String>> = sources
        .iter()
        .flat_map(|s| (1..=s.module.len()).map(|n| s.module[..n].to_vec()))
        .collect();
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut root_items = Vec::new();
    for src in &sources {
        let Some(from) = node(&src.module, &modules) else {
            continue; // lib.rs: the crate root re-exports everything
        };
        let code = code_only(&src.text);
        let mut targets: Vec<Vec<String>> = paths_after(&code, "crate::");
        // `super::x` from `a/b.rs` (module a::b) is a::x; only sibling modules count
        // (`use super::*` in an inline test module is the file's own module).
        let parent = &src.module[..src.module.len().saturating_sub(1)];
        for p in paths_after(&code, "super::") {
            let mut abs = parent.to_vec();
            abs.extend(p);
            if modules.contains(&abs[..parent.len() + 1]) {
                targets.push(abs);
            }
        }
        for t in targets {
            match node(&t, &modules) {
                Some(to) if to != from => {
                    edges
                        .entry(from.clone())
                        .or_default()
                        .entry(to)
                        .or_default()
                        .insert(src.file.display().to_string());
                }
                Some(_) => {}
                None => root_items.push(format!("{}: crate::{}", src.file.display(), t.join("::"))),
            }
        }
    }
    Graph {
        edges,
        root_items,
        sources,
    }
}

fn print_edges(g: &Graph) {
    println!("module edges (from -> to):");
    for (from, tos) in &g.edges {
        for to in tos.keys() {
            println!("  {from} -> {to}");
        }
    }
}

#[test]
fn engine_knows_no_front_end() {
    let g = graph();
    print_edges(&g);
    let mut bad = Vec::new();
    for (from, tos) in &g.edges {
        if from != "engine" && !from.starts_with("engine::") {
            continue;
        }
        for (to, files) in tos {
            if to == "virtio" || to.starts_with("virtio::") || to == "vtd" || to == "domain" {
                bad.push(format!("{from} -> {to} ({files:?})"));
            }
        }
    }
    for src in &g.sources {
        if src.module.first().map(String::as_str) != Some("engine") {
            continue;
        }
        let code = code_only(&src.text);
        for needle in ["spec::", "virtio_queue::", "virtio_bindings::"] {
            if code.contains(needle) {
                bad.push(format!("{} uses `{needle}`", src.file.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "the engine depends on a front end:\n{}",
        bad.join("\n")
    );
}

#[test]
fn module_graph_is_acyclic() {
    let g = graph();
    print_edges(&g);
    assert!(
        g.root_items.is_empty(),
        "modules must name what they use by its module path, not a crate-root re-export:\n{}",
        g.root_items.join("\n")
    );
    // Depth-first search for a back edge; report the cycle.
    fn visit(
        n: &str,
        g: &Graph,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        if let Some(tos) = g.edges.get(n) {
            for to in tos.keys() {
                match state.get(to.as_str()).copied().unwrap_or(0) {
                    0 => visit(to, g, state, stack, cycles),
                    1 => {
                        let at = stack.iter().position(|s| s == to).unwrap_or(0);
                        let mut c = stack[at..].to_vec();
                        c.push(to.clone());
                        cycles.push(c.join(" -> "));
                    }
                    _ => {}
                }
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = Vec::new();
    for n in g.edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            visit(n, &g, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}
