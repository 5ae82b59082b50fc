//! The agent's top-level modules form layers (ARCHITECTURE.md, "Layers of
//! the agent"): imports go one way. This reads every source file with syn,
//! collects each `crate::x` / `super::x` reference that leaves a top-level
//! module, and fails on any cycle, naming it. Test code (`#[cfg(test)]`) is
//! left out: a test may reach anywhere.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Where a file sits: its top-level module and its depth below the crate
/// root (`src/foo.rs` is 1, `src/foo/bar.rs` is 2).
struct Place {
    top: String,
    depth: usize,
}

fn place(src: &Path, file: &Path) -> Option<Place> {
    let rel = file.strip_prefix(src).ok()?;
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let first = parts.first()?.trim_end_matches(".rs").to_string();
    if first == "lib" || first == "main" || parts.last()? == "tests.rs" {
        return None;
    }
    Some(Place {
        top: first,
        depth: parts.len(),
    })
}

/// The top-level module a path's first segments name, if it leaves `from`.
fn target(segments: &[String], from: &Place, extra_depth: usize) -> Option<String> {
    let mut depth = from.depth + extra_depth;
    let mut rest = segments;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            depth = 0;
            rest = &rest[1..];
        }
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                depth = depth.saturating_sub(1);
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    if depth != 0 {
        return None;
    }
    let next = rest.first()?;
    (next != "self" && *next != from.top).then(|| next.clone())
}

struct Collector<'a> {
    from: &'a Place,
    /// Inline `mod x { .. }` nesting inside the file.
    nested: usize,
    found: BTreeSet<String>,
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string().contains("test"))
    })
}

impl Collector<'_> {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.leaf(prefix, n.ident.to_string()),
            syn::UseTree::Rename(r) => self.leaf(prefix, r.ident.to_string()),
            syn::UseTree::Glob(_) => self.leaf(prefix, "*".into()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    fn leaf(&mut self, prefix: &[String], last: String) {
        let mut all = prefix.to_vec();
        all.push(last);
        if let Some(t) = target(&all, self.from, self.nested) {
            self.found.insert(t);
        }
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if is_test_only(attrs) {
            return;
        }
        match item {
            syn::Item::Use(u) => self.use_tree(&mut Vec::new(), &u.tree),
            syn::Item::Mod(m) if m.content.is_some() => {
                self.nested += 1;
                syn::visit::visit_item_mod(self, m);
                self.nested -= 1;
            }
            _ => syn::visit::visit_item(self, item),
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(t) = target(&segments, self.from, self.nested) {
            self.found.insert(t);
        }
        syn::visit::visit_path(self, path);
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(from) = place(&src, &file) else { continue };
        let text = std::fs::read_to_string(&file).expect("read file");
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut c = Collector {
            from: &from,
            nested: 0,
            found: BTreeSet::new(),
        };
        c.visit_file(&ast);
        graph.entry(from.top.clone()).or_default().extend(c.found);
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.g.contains_key(w) {
                continue;
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                t.low.entry(v).and_modify(|l| *l = (*l).min(lw));
            } else if t.stack.contains(&w) {
                let iw = t.index[w];
                t.low.entry(v).and_modify(|l| *l = (*l).min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let g = graph();
    for (m, deps) in &g {
        println!("{m} -> {}", deps.iter().cloned().collect::<Vec<_>>().join(" "));
    }
    assert!(
        g.len() > 20,
        "found only {} modules: is the scan reading src/?",
        g.len()
    );
    let found = cycles(&g);
    assert!(
        found.is_empty(),
        "import cycles between top-level modules of mesh-agent (break them by moving the shared part down a layer; see ARCHITECTURE.md): {found:?}"
    );
}

#[test]
fn the_check_sees_a_cycle_when_there_is_one() {
    let mut g = graph();
    // The authorization seam imported by policy; make it import policy too.
    g.entry("authz".into()).or_default().insert("policy".into());
    let found = cycles(&g);
    assert!(
        found
            .iter()
            .any(|c| c.contains(&"authz".to_string()) && c.contains(&"policy".to_string())),
        "{found:?}"
    );
}
