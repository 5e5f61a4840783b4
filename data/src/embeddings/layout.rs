//! clip-retrieval's folder layout for embeddings, on any storage URL:
//!
//! ```text
//! ROOT/img_emb/img_emb_{i}.npy          image embeddings of part i (rows × dim, float32)
//! ROOT/text_emb/text_emb_{i}.npy        text embeddings of part i
//! ROOT/metadata/metadata_{i}.parquet    key, caption, label of the same rows
//! ```
//!
//! autofaiss, numpy and pandas read it as it is. A part's metadata is written after its
//! embeddings, so a part whose metadata exists is complete (each object is written whole).

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};

use super::metadata::{self, Record};
use super::npy::{self, Matrix};
use contrail_common::storage::{resolve, StoreLocation};

/// Which tower's embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tower {
    Image,
    Text,
}

impl Tower {
    /// The folder and file-name prefix (`img_emb`, `text_emb`).
    pub fn prefix(self) -> &'static str {
        match self {
            Tower::Image => "img_emb",
            Tower::Text => "text_emb",
        }
    }
}

fn child(root: &StorePath, rel: &str) -> StorePath {
    rel.split('/').fold(root.clone(), |p, part| p.child(part))
}

fn part_path(root: &StorePath, tower: Tower, index: usize) -> StorePath {
    let p = tower.prefix();
    child(root, &format!("{p}/{p}_{index}.npy"))
}

fn metadata_path(root: &StorePath, index: usize) -> StorePath {
    child(root, &format!("metadata/metadata_{index}.parquet"))
}

/// One part to write: the embeddings of either tower or both, and their rows' metadata.
pub struct Part<'a> {
    pub index: usize,
    pub image: Option<&'a Matrix>,
    pub text: Option<&'a Matrix>,
    pub records: &'a [Record],
}

/// Writes one part under `root_url`.
pub async fn write_part(root_url: &str, s3_endpoint: &str, part: Part<'_>) -> Result<()> {
    let loc = resolve(root_url, s3_endpoint)?;
    for (tower, m) in [(Tower::Image, part.image), (Tower::Text, part.text)] {
        let Some(m) = m else { continue };
        if m.rows != part.records.len() {
            bail!(
                "part {}: {} {} rows but {} metadata records",
                part.index,
                m.rows,
                tower.prefix(),
                part.records.len()
            );
        }
        put(
            &loc,
            part_path(&loc.path, tower, part.index),
            npy::encode(m),
        )
        .await?;
    }
    put(
        &loc,
        metadata_path(&loc.path, part.index),
        metadata::encode(part.records)?,
    )
    .await
}

async fn put(loc: &StoreLocation, path: StorePath, bytes: Vec<u8>) -> Result<()> {
    loc.store
        .put(&path, PutPayload::from(bytes))
        .await
        .with_context(|| format!("writing {path} under {}", loc.url))?;
    Ok(())
}

async fn get(store: &dyn ObjectStore, path: &StorePath) -> Result<Bytes> {
    let r = store
        .get(path)
        .await
        .with_context(|| format!("reading {path}"))?;
    Ok(r.bytes().await?)
}

/// Every part of one tower under a root, concatenated in part order.
#[derive(Debug)]
pub struct Embeddings {
    pub matrix: Matrix,
    /// One per row; empty when the root has no metadata folder at all.
    pub records: Vec<Record>,
    pub parts: usize,
}

impl Embeddings {
    /// Every row's label, or which row (and key) has none.
    pub fn labels(&self, what: &str) -> Result<Vec<i64>> {
        if self.records.is_empty() {
            bail!("{what} has no metadata, so no labels");
        }
        self.records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.label
                    .with_context(|| format!("{what}: row {i} (key {:?}) has no label", r.key))
            })
            .collect()
    }
}

/// Reads the `tower` embeddings and the metadata of every part under `root_url`.
pub async fn read(root_url: &str, s3_endpoint: &str, tower: Tower) -> Result<Embeddings> {
    let loc = resolve(root_url, s3_endpoint)?;
    let folder = child(&loc.path, tower.prefix());
    let listed: Vec<_> = loc
        .store
        .list(Some(&folder))
        .try_collect()
        .await
        .with_context(|| format!("listing {}/{}", loc.url, tower.prefix()))?;
    let prefix = format!("{}_", tower.prefix());
    let mut indices: Vec<usize> = listed
        .iter()
        .filter_map(|o| o.location.filename())
        .filter_map(|f| f.strip_prefix(&prefix)?.strip_suffix(".npy")?.parse().ok())
        .collect();
    indices.sort_unstable();
    if indices.is_empty() {
        bail!(
            "{} holds no {}/{}{{i}}.npy files (is it an embedding folder written by `contrail embed`?)",
            loc.url,
            tower.prefix(),
            prefix
        );
    }
    let has_metadata = loc
        .store
        .list(Some(&child(&loc.path, "metadata")))
        .try_next()
        .await
        .ok()
        .flatten()
        .is_some();
    let (mut data, mut records, mut dim) = (Vec::new(), Vec::new(), None);
    let mut rows = 0;
    for &i in &indices {
        let path = part_path(&loc.path, tower, i);
        let m = npy::decode(&get(loc.store.as_ref(), &path).await?, path.as_ref())?;
        if *dim.get_or_insert(m.dim) != m.dim {
            bail!(
                "{path} has dimension {} but the parts before it have {}",
                m.dim,
                dim.unwrap_or(0)
            );
        }
        if has_metadata {
            let mpath = metadata_path(&loc.path, i);
            let recs = metadata::decode(get(loc.store.as_ref(), &mpath).await?, mpath.as_ref())?;
            if recs.len() != m.rows {
                bail!("{mpath} has {} rows but {path} has {}", recs.len(), m.rows);
            }
            records.extend(recs);
        }
        rows += m.rows;
        data.extend(m.data);
    }
    Ok(Embeddings {
        matrix: Matrix::new(rows, dim.unwrap_or(0), data)?,
        records,
        parts: indices.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(keys: &[&str], label: i64) -> Vec<Record> {
        keys.iter()
            .map(|k| Record {
                key: k.to_string(),
                caption: Some(format!("caption {k}")),
                label: Some(label),
            })
            .collect()
    }

    #[tokio::test]
    async fn parts_are_read_back_in_order() {
        let root = "memory://layout-test/emb";
        let a = Matrix::new(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = Matrix::new(1, 3, vec![7.0, 8.0, 9.0]).unwrap();
        let (ra, rb) = (records(&["a0", "a1"], 1), records(&["b0"], 2));
        // Part 10 sorts after part 2 numerically, not as text.
        for (index, m, r) in [(10, &b, &rb), (2, &a, &ra)] {
            let part = Part {
                index,
                image: Some(m),
                text: Some(m),
                records: r,
            };
            write_part(root, "", part).await.unwrap();
        }
        let e = read(root, "", Tower::Image).await.unwrap();
        assert_eq!(e.parts, 2);
        assert_eq!(e.matrix.rows, 3);
        assert_eq!(e.matrix.row(2), [7.0, 8.0, 9.0]);
        assert_eq!(e.labels("emb").unwrap(), [1, 1, 2]);
        assert_eq!(e.records[2].key, "b0");
        let t = read(root, "", Tower::Text).await.unwrap();
        assert_eq!(t.matrix, e.matrix);

        let bad = Part {
            index: 0,
            image: Some(&a),
            text: None,
            records: &rb,
        };
        let err = write_part("memory://layout-test/bad", "", bad)
            .await
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("2 img_emb rows but 1 metadata records"));
        let err = read("memory://layout-test/none", "", Tower::Image)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("holds no img_emb/img_emb_{i}.npy"),
            "{err}"
        );
    }
}
