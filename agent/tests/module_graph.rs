//! The crate's module graph has no cycle: data flows one way (config → plan → install →
//! supervise → probe → report), and the leaf vocabulary imports nothing from the crate.
//!
//! Reads the crate's own sources: every `crate::<module>` path outside unit tests is an edge
//! from the file's top-level module to `<module>`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Production code only: unit tests and their fixtures (`#[cfg(test)]` modules, which the
/// crate keeps at the end of a file) may reach anywhere.
fn without_unit_tests(text: &str) -> &str {
    let test_module = text.match_indices("#[cfg(test)]\n").find(|(at, marker)| {
        let next = text[at + marker.len()..].trim_start();
        next.starts_with("mod ")
            || next.starts_with("pub(crate) mod ")
            || next.starts_with("pub(super) mod ")
    });
    match test_module {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// Every module named right after `crate::`, including inside `crate::{a, b::c}` groups.
fn crate_references(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = Path::new(first)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = fs::read_to_string(&file).unwrap();
        let edges = graph.entry(module.clone()).or_default();
        for target in crate_references(without_unit_tests(&text)) {
            if target != module {
                edges.insert(target);
            }
        }
    }
    graph
}

/// A cycle through `graph`, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut done, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = graph();
    assert!(graph.len() > 10, "read the crate: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("module cycle: {}\ngraph: {graph:#?}", cycle.join(" → "));
    }
}

#[test]
fn the_vocabulary_is_a_leaf_and_services_sit_below_config() {
    let graph = graph();
    assert_eq!(graph["model"], BTreeSet::new(), "model imports nothing");
    assert!(
        graph["schema"].iter().all(|m| m == "model"),
        "the key walk knows no section: {:?}",
        graph["schema"]
    );
    for lower in [
        "model",
        "schema",
        "platform",
        "supervise",
        "services",
        "state",
    ] {
        assert!(
            !graph[lower].contains("config"),
            "{lower} must not import config: {:?}",
            graph[lower]
        );
    }
}

#[test]
fn the_detector_finds_a_cycle() {
    let mut graph = Graph::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    graph.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&graph), None);
    assert_eq!(
        crate_references("use crate::{a::X, b};\nlet _ = crate::c::f();"),
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    );
}
