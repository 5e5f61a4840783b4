//! The image-folder and CSV/TSV layouts, read into one list of [`Listed`] samples per split.
//!
//! - Image folder, as torchvision's `ImageFolder`: `ROOT/<class>/<image>`. When `ROOT/train` and
//!   `ROOT/test` (or `ROOT/val`) exist, each is such a tree and becomes that split; otherwise
//!   the whole tree is the train split. Classes are the sorted folder names unless `--classes`
//!   gives them. A caption comes from a sidecar `<image stem>.txt` when there is one.
//! - CSV/TSV (the listing img2dataset reads): `image path, caption[, label]`, one sample per
//!   row; `.tsv` files are tab-separated; a first row naming the columns is skipped; relative
//!   paths are taken from the listing's folder; a label is a class index or a class name.
//!
//! A layout without a test split can have one held out ([`hold_out`]): a fixed fraction of
//! every class, chosen by a hash of the image's path, so a re-import picks the same samples
//! whatever the listing's order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// One sample found by a listing, before its file is read.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    pub path: PathBuf,
    pub caption: Option<String>,
    /// The class name as the listing gives it (folder name, or the CSV's label column).
    pub class: Option<String>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .is_some_and(|e| matches!(e.as_str(), "jpg" | "jpeg" | "png" | "webp"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    v.sort();
    Ok(v)
}

/// The samples of one `<class>/<image>` tree, and its class folder names.
fn class_tree(root: &Path) -> Result<(Vec<Listed>, Vec<String>)> {
    let mut out = Vec::new();
    let mut classes = Vec::new();
    for dir in sorted_entries(root)? {
        if !dir.is_dir() {
            continue;
        }
        let class = dir
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} is not a UTF-8 name", dir.display()))?
            .to_string();
        classes.push(class.clone());
        for file in sorted_entries(&dir)? {
            if !file.is_file() || !is_image(&file) {
                continue;
            }
            let caption = std::fs::read_to_string(file.with_extension("txt"))
                .ok()
                .map(|c| c.trim().to_string());
            out.push(Listed {
                path: file,
                caption,
                class: Some(class.clone()),
            });
        }
    }
    Ok((out, classes))
}

/// An image-folder dataset: its splits (`train`, and `test` when present) and the class
/// names found (sorted, the union over splits).
pub fn image_folder(root: &Path) -> Result<(BTreeMap<String, Vec<Listed>>, Vec<String>)> {
    if !root.is_dir() {
        bail!("{} is not a folder", root.display());
    }
    let mut splits = BTreeMap::new();
    let mut names = std::collections::BTreeSet::new();
    let test = ["test", "val"]
        .iter()
        .map(|s| root.join(s))
        .find(|p| p.is_dir());
    match (root.join("train").is_dir(), test) {
        (true, test) => {
            let (train, c) = class_tree(&root.join("train"))?;
            names.extend(c);
            splits.insert("train".to_string(), train);
            if let Some(test) = test {
                let (t, c) = class_tree(&test)?;
                names.extend(c);
                splits.insert("test".to_string(), t);
            }
        }
        (false, _) => {
            let (all, c) = class_tree(root)?;
            names.extend(c);
            splits.insert("train".to_string(), all);
        }
    }
    if splits.values().all(Vec::is_empty) {
        bail!(
            "{} holds no <class>/<image> files (jpg, jpeg, png, webp)",
            root.display()
        );
    }
    Ok((splits, names.into_iter().collect()))
}

/// Splits one CSV/TSV line into fields (RFC 4180 quoting: `"a, b"`, `""` for a quote).
fn fields(line: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            c if c == sep && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// A CSV/TSV listing's samples (all in the train split). Rows with fewer than two fields are
/// an error naming the line.
pub fn csv_listing(file: &Path) -> Result<Vec<Listed>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let sep = if file.extension().is_some_and(|e| e == "tsv") {
        '\t'
    } else {
        ','
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let f = fields(line, sep);
        if n == 0 && ["path", "image", "image_path", "filepath", "url"].contains(&f[0].trim()) {
            continue;
        }
        if f.len() < 2 {
            bail!(
                "{} line {}: expected `image path{sep}caption[{sep}label]`, got {line:?}",
                file.display(),
                n + 1
            );
        }
        let path = PathBuf::from(f[0].trim());
        out.push(Listed {
            path: if path.is_absolute() {
                path
            } else {
                base.join(path)
            },
            caption: Some(f[1].clone()).filter(|c| !c.is_empty()),
            class: f
                .get(2)
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty()),
        });
    }
    Ok(out)
}

/// FNV-1a over the path's bytes: fixed forever, so a held-out split never moves between
/// versions or machines.
fn path_hash(path: &Path) -> u64 {
    path.as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Splits `listed` into (train, test) with `round(fraction × n)` of each class's `n` samples
/// in test (samples without a class form one group), so every class is evaluated in
/// proportion. Which samples go is decided by [`path_hash`]; both parts keep the listing's
/// order.
pub fn hold_out(listed: Vec<Listed>, fraction: f64) -> (Vec<Listed>, Vec<Listed>) {
    let mut groups: BTreeMap<Option<&str>, Vec<(u64, usize)>> = BTreeMap::new();
    for (i, item) in listed.iter().enumerate() {
        groups
            .entry(item.class.as_deref())
            .or_default()
            .push((path_hash(&item.path), i));
    }
    let mut to_test = vec![false; listed.len()];
    for members in groups.values_mut() {
        members.sort_unstable();
        let take = (fraction * members.len() as f64).round() as usize;
        for &(_, i) in members.iter().take(take) {
            to_test[i] = true;
        }
    }
    let (test, train): (Vec<_>, Vec<_>) =
        listed.into_iter().zip(to_test).partition(|(_, held)| *held);
    (
        train.into_iter().map(|(l, _)| l).collect(),
        test.into_iter().map(|(l, _)| l).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(path: &str, class: Option<&str>) -> Listed {
        Listed {
            path: PathBuf::from(path),
            caption: None,
            class: class.map(str::to_string),
        }
    }

    #[test]
    fn hold_out_takes_the_fraction_of_every_class_whatever_the_order() {
        let mut all: Vec<Listed> = (0..40)
            .map(|i| listed(&format!("cat/{i}.png"), Some("cat")))
            .chain((0..10).map(|i| listed(&format!("dog/{i}.png"), Some("dog"))))
            .chain((0..5).map(|i| listed(&format!("x/{i}.png"), None)))
            .collect();
        let (train, test) = hold_out(all.clone(), 0.2);
        let count =
            |v: &[Listed], c: Option<&str>| v.iter().filter(|l| l.class.as_deref() == c).count();
        assert_eq!(
            [
                count(&test, Some("cat")),
                count(&test, Some("dog")),
                count(&test, None)
            ],
            [8, 2, 1]
        );
        assert_eq!(train.len() + test.len(), 55);
        assert!(test.iter().all(|t| !train.contains(t)));
        // The listing's order is kept inside each part.
        let pos = |l: &Listed| all.iter().position(|a| a == l).unwrap();
        assert!(test.windows(2).all(|w| pos(&w[0]) < pos(&w[1])));
        // Reversing the listing holds out the very same samples.
        all.reverse();
        let (_, again) = hold_out(all, 0.2);
        let mut a: Vec<_> = test.iter().map(|l| l.path.clone()).collect();
        let mut b: Vec<_> = again.iter().map(|l| l.path.clone()).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }

    #[test]
    fn csv_fields_follow_rfc_4180_quoting() {
        assert_eq!(
            fields(r#"a.jpg,"a cat, sitting",3"#, ','),
            ["a.jpg", "a cat, sitting", "3"]
        );
        assert_eq!(
            fields(r#"b.png,"say ""hi""""#, ','),
            ["b.png", r#"say "hi""#]
        );
        assert_eq!(fields("c.jpg\ta dog\tdog", '\t'), ["c.jpg", "a dog", "dog"]);
    }
}
