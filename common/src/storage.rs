//! Object-store URLs: which store serves a URL, brace patterns, and shard listing.
//!
//! `file://` is the default (a plain path means a local file; relative paths are taken from the
//! current directory). `memory://` is one process-wide in-memory store, for tests. `s3://`,
//! `gs://` and `az://` take their credentials from the environment (AWS_*, GOOGLE_*, AZURE_*),
//! never from the job file; `s3_endpoint` points S3 at a compatible server.

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use object_store::{memory::InMemory, path::Path as StorePath, ObjectStore};
use std::sync::{Arc, OnceLock};
use url::Url;

/// A resolved URL: the store that serves it and the object path inside that store.
#[derive(Clone, Debug)]
pub struct StoreLocation {
    pub store: Arc<dyn ObjectStore>,
    pub path: StorePath,
    /// The normalized URL (absolute `file://` paths), used as the shard's name.
    pub url: String,
}

fn memory_store() -> Arc<dyn ObjectStore> {
    static STORE: OnceLock<Arc<InMemory>> = OnceLock::new();
    STORE.get_or_init(|| Arc::new(InMemory::new())).clone()
}

/// Turns plain and relative paths into absolute `file://` URLs; leaves other URLs alone.
pub fn normalize_url(raw: &str) -> Result<String> {
    let raw = raw.trim();
    if raw.contains("://") && !raw.starts_with("file://") {
        return Ok(raw.to_string());
    }
    let path = raw.strip_prefix("file://").unwrap_or(raw);
    let path = std::path::Path::new(path);
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .context("reading the current directory to resolve a relative file:// URL")?
            .join(path)
    };
    // Drop `.` components so the same directory always yields the same URL.
    let mut clean = std::path::PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    Ok(format!("file://{}", clean.display()))
}

/// Whether `raw` names object storage (S3, GCS, Azure), not a local folder or the in-memory
/// store: what `contrail local` must never fill with synthetic data.
pub fn is_object_storage(raw: &str) -> Result<bool> {
    let url_str = normalize_url(raw)?;
    let url = Url::parse(&url_str).with_context(|| format!("parsing storage URL {url_str:?}"))?;
    Ok(!matches!(url.scheme(), "file" | "memory"))
}

/// Resolves a URL to its store. `s3_endpoint` (may be empty) overrides the S3 endpoint.
pub fn resolve(raw: &str, s3_endpoint: &str) -> Result<StoreLocation> {
    let url_str = normalize_url(raw)?;
    let url = Url::parse(&url_str).with_context(|| format!("parsing storage URL {url_str:?}"))?;
    match url.scheme() {
        "file" => {
            let fs_path = url.path();
            let store: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
            let path = StorePath::from_filesystem_path(fs_path)
                .or_else(|_| StorePath::parse(fs_path.trim_start_matches('/')))
                .with_context(|| format!("bad local path in {url_str}"))?;
            Ok(StoreLocation {
                store,
                path,
                url: url_str,
            })
        }
        "memory" => {
            let joined = format!(
                "{}{}",
                url.host_str().unwrap_or(""),
                url.path()
            );
            let path = StorePath::parse(joined.trim_matches('/'))
                .with_context(|| format!("bad memory:// path in {url_str}"))?;
            Ok(StoreLocation {
                store: memory_store(),
                path,
                url: url_str,
            })
        }
        "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure" => {
            let mut opts: Vec<(String, String)> = Vec::new();
            if url.scheme().starts_with("s3") && !s3_endpoint.is_empty() {
                opts.push(("aws_endpoint".into(), s3_endpoint.to_string()));
                if s3_endpoint.starts_with("http://") {
                    opts.push(("aws_allow_http".into(), "true".into()));
                }
            }
            // Credentials come from the environment (Kubernetes Secrets, workload identity).
            for (k, v) in std::env::vars() {
                let lower = k.to_ascii_lowercase();
                if (lower.starts_with("aws_") || lower.starts_with("google_") || lower.starts_with("azure_"))
                    && !opts.iter().any(|(o, _)| *o == lower) {
                        opts.push((lower, v));
                    }
            }
            let (store, path) = object_store::parse_url_opts(&url, opts)
                .with_context(|| format!("opening object store for {url_str}"))?;
            Ok(StoreLocation {
                store: Arc::from(store),
                path,
                url: url_str,
            })
        }
        other => bail!(
            "unsupported storage scheme {other:?} in {url_str}; use file://, memory://, s3://, gs:// or az://"
        ),
    }
}

/// Expands every `{a..b}` range (zero padding follows the width of `a`) and `{x,y,z}` list.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|i| i + open)
        .ok_or_else(|| anyhow!("unclosed '{{' in shard pattern {pattern:?}"))?;
    let (prefix, body, suffix) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let alternatives: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let lo: u64 = a
            .parse()
            .with_context(|| format!("bad range start {a:?} in {pattern:?}"))?;
        let hi: u64 = b
            .parse()
            .with_context(|| format!("bad range end {b:?} in {pattern:?}"))?;
        if hi < lo {
            bail!("range {{{body}}} in {pattern:?} runs backwards");
        }
        if hi - lo > 10_000_000 {
            bail!("range {{{body}}} in {pattern:?} is too large");
        }
        let width = a.len();
        (lo..=hi).map(|i| format!("{i:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    let rest = expand_braces(suffix)?;
    let mut out = Vec::with_capacity(alternatives.len() * rest.len());
    for alt in &alternatives {
        for r in &rest {
            out.push(format!("{prefix}{alt}{r}"));
        }
    }
    Ok(out)
}

/// Lists the shard URLs of a dataset spec: a brace pattern, a single `.tar` URL, or a prefix
/// under which every `.tar` object is a shard. Sorted, so every caller sees the same list.
pub async fn list_shards(spec: &str, s3_endpoint: &str) -> Result<Vec<String>> {
    if spec.contains('{') {
        let urls = expand_braces(spec)?;
        return urls.iter().map(|u| normalize_url(u)).collect();
    }
    let loc = resolve(spec, s3_endpoint)?;
    if loc.url.ends_with(".tar") {
        return Ok(vec![loc.url]);
    }
    list_objects(spec, s3_endpoint, ".tar").await
}

/// Every object under the prefix `url` whose name ends with `suffix`, as URLs, sorted; empty
/// when a local folder does not exist.
pub async fn list_objects(url: &str, s3_endpoint: &str, suffix: &str) -> Result<Vec<String>> {
    let loc = resolve(url, s3_endpoint)?;
    if loc.url.starts_with("file://") {
        let dir = loc.url.trim_start_matches("file://");
        if !std::path::Path::new(dir).exists() {
            return Ok(Vec::new());
        }
    }
    let objects: Vec<_> = loc
        .store
        .list(Some(&loc.path))
        .try_collect()
        .await
        .with_context(|| format!("listing {} under {}", suffix, loc.url))?;
    let base = loc.url.trim_end_matches('/');
    let prefix_path = loc.path.as_ref();
    let mut urls: Vec<String> = objects
        .into_iter()
        .filter(|m| m.location.as_ref().ends_with(suffix))
        .map(|m| {
            let rel = m.location.as_ref();
            let rel = rel
                .strip_prefix(prefix_path)
                .unwrap_or(rel)
                .trim_start_matches('/');
            format!("{base}/{rel}")
        })
        .collect();
    urls.sort();
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;

    #[test]
    fn braces_expand_with_padding_and_lists() {
        let v = expand_braces("s3://b/data-{000008..000011}.tar").unwrap();
        assert_eq!(
            v,
            vec![
                "s3://b/data-000008.tar",
                "s3://b/data-000009.tar",
                "s3://b/data-000010.tar",
                "s3://b/data-000011.tar"
            ]
        );
        let v = expand_braces("x/{a,b}-{0..1}.tar").unwrap();
        assert_eq!(v, vec!["x/a-0.tar", "x/a-1.tar", "x/b-0.tar", "x/b-1.tar"]);
        assert!(expand_braces("x/{3..1}.tar").is_err());
        assert!(expand_braces("x/{3..1.tar").is_err());
    }

    #[test]
    fn relative_file_urls_become_absolute() {
        let u = normalize_url("file://./run/data").unwrap();
        assert!(u.starts_with("file:///"), "{u}");
        assert!(u.ends_with("/run/data"), "{u}");
        assert_eq!(normalize_url("s3://b/k").unwrap(), "s3://b/k");
    }

    #[test]
    fn object_storage_is_told_from_local_folders_and_memory() {
        for (url, remote) in [
            ("s3://bucket/data", true),
            ("gs://bucket/data", true),
            ("az://container/data", true),
            ("file:///tmp/data", false),
            ("/tmp/data", false),
            ("memory://t/data", false),
        ] {
            assert_eq!(is_object_storage(url).unwrap(), remote, "{url}");
        }
    }

    #[tokio::test]
    async fn memory_prefix_lists_only_tars_sorted() {
        let loc = resolve("memory://listing-test/a/b.tar", "").unwrap();
        loc.store
            .put(&loc.path, PutPayload::from_static(b"x"))
            .await
            .unwrap();
        let loc2 = resolve("memory://listing-test/a/a.tar", "").unwrap();
        loc2.store
            .put(&loc2.path, PutPayload::from_static(b"x"))
            .await
            .unwrap();
        let loc3 = resolve("memory://listing-test/a/readme.txt", "").unwrap();
        loc3.store
            .put(&loc3.path, PutPayload::from_static(b"x"))
            .await
            .unwrap();
        let urls = list_shards("memory://listing-test/a", "").await.unwrap();
        assert_eq!(
            urls,
            vec![
                "memory://listing-test/a/a.tar",
                "memory://listing-test/a/b.tar"
            ]
        );
    }

    #[test]
    fn unknown_scheme_is_a_clear_error() {
        let e = resolve("ftp://host/x.tar", "").unwrap_err().to_string();
        assert!(e.contains("unsupported storage scheme"), "{e}");
    }
}
