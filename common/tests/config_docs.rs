//! docs/config.md documents every job-file key: each table of the default config has its
//! section, and each key in it appears (in backticks) within that section.

use contrail_common::config::JobConfig;
use std::collections::BTreeMap;

/// Section heading path (`data.augment`) → the text under that heading.
fn doc_sections(doc: &str) -> BTreeMap<String, String> {
    let mut sections = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if line.starts_with('#') {
            current = line
                .split_once("`[")
                .and_then(|(_, rest)| rest.split_once("]`"))
                .map(|(path, _)| path.to_string());
            if let Some(path) = &current {
                sections.entry(path.clone()).or_insert_with(String::new);
            }
            continue;
        }
        if let Some(path) = &current {
            let text = sections.get_mut(path).unwrap();
            text.push_str(line);
            text.push('\n');
        }
    }
    sections
}

/// Every (table path, key) of `table`, tables nested below it included.
fn keys(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) {
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                keys(&path, inner, out);
            }
            _ => out.push((prefix.to_string(), key.clone())),
        }
    }
}

#[test]
fn every_config_key_is_documented_in_its_section() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md"))
        .expect("docs/config.md");
    let sections = doc_sections(&doc);
    let defaults =
        toml::Table::try_from(JobConfig::default()).expect("the default config serialises");
    let mut all = Vec::new();
    keys("", &defaults, &mut all);
    assert!(all.len() > 50, "only {} keys found: {all:?}", all.len());
    let missing: Vec<String> = all
        .iter()
        .filter(|(table, key)| {
            !sections
                .get(table)
                .is_some_and(|text| text.contains(&format!("`{key}`")))
        })
        .map(|(table, key)| format!("{table}.{key}"))
        .collect();
    assert!(
        missing.is_empty(),
        "keys not documented in their section of docs/config.md: {missing:?}"
    );
}

#[test]
fn sections_are_found_in_the_doc() {
    let sections = doc_sections("## `[a]`\n| `x` |\n### `[a.b]` (note)\n| `y` |\n# Other\nz\n");
    assert_eq!(sections["a"], "| `x` |\n");
    assert_eq!(sections["a.b"], "| `y` |\n");
    assert_eq!(sections.len(), 2);
}
