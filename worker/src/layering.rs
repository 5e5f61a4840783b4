//! The crate's module stack (see the crate docs), checked from the source: every `crate::`
//! path in a module's files must name a module on a line above its own.

/// The stack, bottom first; modules on one line may not use each other.
const LAYERS: &[&[&str]] = &[
    &["torch_ext"],
    &["dist"],
    &["nn", "tokenize"],
    &["optim", "eval"],
    &["moe"],
    &["model"],
    &["objective"],
    &["train"],
    &["process", "export"],
    &["embed"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `(file, line, used module)` for every `crate::<module>` outside comments.
fn crate_paths(path: &std::path::Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push((n + 1, name));
        }
    }
    found
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_uses_one_above_or_beside_it() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut seen_modules = std::collections::BTreeSet::new();
    let mut violations = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "layering" {
            continue;
        }
        seen_modules.insert(module.clone());
        let own = layer_of(&module)
            .unwrap_or_else(|| panic!("module `{module}` is not in LAYERS: give it a layer"));
        for (line, used) in crate_paths(file) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < own => {}
                _ => violations.push(format!(
                    "{}:{line}: `{module}` uses `crate::{used}`",
                    rel.display()
                )),
            }
        }
    }
    let listed: std::collections::BTreeSet<String> = LAYERS
        .iter()
        .flat_map(|l| l.iter().map(|m| m.to_string()))
        .collect();
    assert_eq!(
        listed, seen_modules,
        "LAYERS and src/ list different modules"
    );
    assert!(
        violations.is_empty(),
        "imports against the module stack:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    let dir = std::env::temp_dir().join(format!("contrail-layering-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("probe.rs");
    std::fs::write(
        &file,
        "use crate::train::step; // crate::process in a comment\n/// crate::optim in a doc\n",
    )
    .unwrap();
    let paths = crate_paths(&file);
    assert_eq!(paths, vec![(1, "train".to_string())]);
    assert!(layer_of("train") > layer_of("model"));
    std::fs::remove_dir_all(&dir).unwrap();
}
