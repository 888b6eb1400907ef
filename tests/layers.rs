//! The module graph of `src/`: each top-level module uses only the layers
//! below it (the table in docs/architecture.md, "Layers"), so the graph has
//! no cycle. Read from the source text: every `crate::X` and
//! `conntrack_metrics::X` path outside comments and test-only code.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// What each layer may use; `log` (the crate-root macro) is allowed
/// everywhere, and the binaries (`main`, `bin`) may use every layer.
const ALLOWED: &[(&str, &[&str])] = &[
    ("sys", &[]),
    ("wire", &[]),
    ("stats", &[]),
    ("flow", &["wire", "stats", "sys"]),
    ("service_names", &["flow", "stats"]),
    ("offload", &["wire", "flow", "sys"]),
    ("reader", &["sys", "wire", "flow", "stats"]),
    ("census", &["sys", "wire", "flow", "stats"]),
    ("expo", &["stats", "sys"]),
    ("config", &["flow"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Files declared only under `#[cfg(test)]` (`#[cfg(test)] mod x;`).
fn test_only_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for file in files {
        let text = fs::read_to_string(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.windows(2) {
            if pair[0].trim() != "#[cfg(test)]" {
                continue;
            }
            let decl = pair[1].trim().trim_start_matches("pub(crate) ");
            if let Some(name) = decl.strip_prefix("mod ").and_then(|d| d.strip_suffix(';')) {
                let dir = file.parent().unwrap();
                let base = if file.ends_with("mod.rs") || file.ends_with("lib.rs") {
                    dir.to_path_buf()
                } else {
                    dir.join(file.file_stem().unwrap())
                };
                out.insert(base.join(format!("{name}.rs")));
                out.insert(base.join(name).join("mod.rs"));
            }
        }
    }
    out
}

/// The code of `text` without comments and without what follows the first
/// `#[cfg(test)]` item that is not a one-line module declaration (test
/// modules sit at the bottom of each file).
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]" {
            let next = lines.peek().map_or("", |l| l.trim());
            if next.starts_with("mod ") && next.ends_with(';')
                || next.starts_with("pub(crate) mod ") && next.ends_with(';')
            {
                lines.next();
                continue;
            }
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        out.push_str(line.split(" // ").next().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The layer a file under `src/` belongs to.
fn layer(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn used_layers(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for prefix in ["crate::", "conntrack_metrics::"] {
        for (at, _) in code.match_indices(prefix) {
            let rest = &code[at + prefix.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

#[test]
fn each_layer_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let test_only = test_only_files(&files);
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for file in files.iter().filter(|f| !test_only.contains(*f)) {
        let from = layer(&src, file);
        let code = production_code(&fs::read_to_string(file).unwrap());
        for to in used_layers(&code) {
            if to == from || to == "log" {
                continue;
            }
            graph.entry(from.clone()).or_default().insert(to.clone());
            if let Some(ok) = allowed.get(from.as_str()) {
                if !ok.contains(&to.as_str()) {
                    wrong.push(format!("{} uses {to}", file.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    // Every library layer is in the table, so nothing escapes the check.
    for from in graph
        .keys()
        .filter(|l| !["main", "bin", "lib"].contains(&l.as_str()))
    {
        assert!(
            allowed.contains_key(from.as_str()),
            "layer {from} is not in ALLOWED"
        );
    }
    // The table itself has no cycle: each layer uses only earlier ones.
    for (i, (layer, uses)) in ALLOWED.iter().enumerate() {
        for used in *uses {
            let at = ALLOWED.iter().position(|(l, _)| l == used);
            assert!(
                at.is_some_and(|at| at < i),
                "{layer} uses {used}, not below it"
            );
        }
    }
    println!("module graph: {graph:?}");
}
