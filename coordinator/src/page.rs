//! `GET /`: the status page for a person. One self-contained HTML file (inline CSS and JS, no
//! external assets, so it works on a cluster without internet access) that polls `status`
//! (relative, so it also works behind a proxy path) every second and redraws in place.

use axum::http::header;
use axum::response::IntoResponse;

/// The page, embedded in the binary.
pub const STATUS_PAGE: &str = include_str!("status_page.html");

pub async fn status_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page is small and changes with the binary; never serve a stale copy.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STATUS_PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::STATUS_PAGE;
    use std::collections::BTreeSet;

    /// The strings between `open` and the next `close`, for every `open` in the page that
    /// does not continue a longer name (`text("` but not `getContext("`).
    fn all_between<'a>(open: &str, close: char) -> Vec<&'a str> {
        STATUS_PAGE
            .match_indices(open)
            .filter(|&(i, _)| {
                let before = STATUS_PAGE[..i].chars().next_back();
                !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            })
            .filter_map(|(i, _)| STATUS_PAGE[i + open.len()..].split(close).next())
            .collect()
    }

    #[test]
    fn every_element_the_script_looks_up_is_in_the_markup() {
        let ids: BTreeSet<&str> = all_between("id=\"", '"').into_iter().collect();
        // `$("id")` and `text("id", ...)`; "shards-" is a prefix completed below.
        let looked_up: BTreeSet<&str> = all_between("$(\"", '"')
            .into_iter()
            .chain(all_between("text(\"", '"'))
            .filter(|id| !id.ends_with('-'))
            .collect();
        assert!(looked_up.len() > 20, "found only {looked_up:?}");
        let missing: Vec<_> = looked_up.difference(&ids).collect();
        assert!(
            missing.is_empty(),
            "the script looks up ids the page lacks: {missing:?}"
        );
        // Built from a prefix and a shard state in renderShards.
        for k in ["done", "leased", "pending", "failed"] {
            for id in [format!("shards-{k}"), format!("shards-{k}-bar")] {
                assert!(ids.contains(id.as_str()), "no #{id}");
            }
        }
    }

    #[test]
    fn page_is_well_formed_enough() {
        assert!(STATUS_PAGE.starts_with("<!doctype html>"));
        assert!(STATUS_PAGE.contains("<meta charset=\"utf-8\">"));
        for tag in ["html", "head", "body", "style", "script", "main", "table"] {
            let opens = STATUS_PAGE.matches(&format!("<{tag}>")).count()
                + STATUS_PAGE.matches(&format!("<{tag} ")).count();
            let closes = STATUS_PAGE.matches(&format!("</{tag}>")).count();
            assert_eq!(
                opens, closes,
                "<{tag}> opened {opens} times, closed {closes}"
            );
        }
        let ids = all_between("id=\"", '"');
        let unique: BTreeSet<_> = ids.iter().collect();
        assert_eq!(ids.len(), unique.len(), "duplicate ids in {ids:?}");
    }
}
