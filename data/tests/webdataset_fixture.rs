//! Reads shards written by the Python `webdataset` package (and by Python's tarfile in GNU and
//! ustar formats) and checks that every key and member byte matches what webdataset itself
//! reads from them (tests/fixtures/webdataset/expected.json, made by make_fixture.py).

use contrail_data::shard_reader::read_shard;
use contrail_data::tar_stream::TarStreamParser;
use contrail_data::Sample;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/webdataset")
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// (key, extension → sha256) in archive order.
type Digests = Vec<(String, BTreeMap<String, String>)>;

fn digests(samples: &[Sample]) -> Digests {
    samples
        .iter()
        .map(|s| {
            let members = s
                .members
                .iter()
                .map(|(ext, data)| (ext.clone(), sha256_hex(data)))
                .collect();
            (s.key.clone(), members)
        })
        .collect()
}

struct ExpectedShard {
    name: String,
    sha256: String,
    samples: Digests,
}

fn expected() -> Vec<ExpectedShard> {
    let path = fixture_dir().join("expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("expected.json is JSON");
    let shards = json["shards"].as_object().expect("shards object");
    assert_eq!(shards.len(), 3, "fixture shards: {:?}", shards.keys());
    shards
        .iter()
        .map(|(name, shard)| ExpectedShard {
            name: name.clone(),
            sha256: shard["sha256"].as_str().expect("sha256").to_string(),
            samples: shard["samples"]
                .as_array()
                .expect("samples array")
                .iter()
                .map(|s| {
                    let members = s["members"]
                        .as_object()
                        .expect("members")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().expect("hex digest").to_string()))
                        .collect();
                    (s["key"].as_str().expect("key").to_string(), members)
                })
                .collect(),
        })
        .collect()
}

#[test]
fn parser_groups_exactly_like_webdataset_for_any_chunking() {
    for shard in expected() {
        let data = std::fs::read(fixture_dir().join(&shard.name)).expect("fixture shard");
        assert_eq!(
            sha256_hex(&data),
            shard.sha256,
            "{} differs from expected.json",
            shard.name
        );
        for chunk in [1, 333, 512, 4096, data.len()] {
            let mut parser = TarStreamParser::new(shard.name.clone());
            let mut out = Vec::new();
            for piece in data.chunks(chunk) {
                parser.push(piece, &mut out).expect("fixture parses");
            }
            parser.finish().expect("fixture ends cleanly");
            assert_eq!(
                digests(&out),
                shard.samples,
                "{} read in {chunk}-byte chunks",
                shard.name
            );
        }
    }
}

#[tokio::test]
async fn read_shard_delivers_the_webdataset_samples_that_have_images() {
    for shard in expected() {
        let url = format!("file://{}", fixture_dir().join(&shard.name).display());
        let mut got = Vec::new();
        let stats = read_shard(&url, "", 0, |s| {
            got.push(s);
            async { ControlFlow::Continue(()) }
        })
        .await
        .unwrap_or_else(|e| panic!("reading {url}: {e:#}"));
        let with_image: Digests = shard
            .samples
            .iter()
            .filter(|(_, m)| {
                ["jpg", "jpeg", "png", "webp"]
                    .iter()
                    .any(|e| m.contains_key(*e))
            })
            .cloned()
            .collect();
        let without_image = (shard.samples.len() - with_image.len()) as u64;
        assert_eq!(digests(&got), with_image, "{url}");
        assert_eq!(stats.samples, with_image.len() as u64);
        assert_eq!(
            stats.bad.get("missing_image").copied().unwrap_or(0),
            without_image,
            "{url}: {:?}",
            stats.bad
        );
        assert!(got.iter().all(|s| s.shard.ends_with(&shard.name)));
    }
}

#[test]
fn fixture_covers_the_tricky_names() {
    let all: Vec<String> = expected()
        .into_iter()
        .flat_map(|s| s.samples.into_iter().map(|(k, _)| k))
        .collect();
    // A dot in the base name splits the key early; dotted directories do not.
    assert!(all.iter().any(|k| k == "img"), "{all:?}");
    assert!(all.iter().any(|k| k == "dir.v1/sample_a"), "{all:?}");
    // Long names through pax `path=`, GNU ././@LongLink and the ustar prefix field.
    assert!(all.iter().filter(|k| k.len() > 100).count() >= 3, "{all:?}");
}
