//! Incremental tar parsing: bytes in (in chunks of any size), WebDataset samples out.
//!
//! The parser is push-based so a shard is never held in memory whole: only the member being
//! read and the sample being grouped are buffered. It understands v7, POSIX ustar (with the
//! `prefix` field), GNU (`././@LongLink` long names, base-256 sizes) and pax (`path=`, `size=`)
//! headers, validates every header checksum, and skips directories, links and other non-regular
//! members the way Python's `tarfile` does (so WebDataset shards read the same here as there).
//!
//! Grouping follows `webdataset.tariterators`: members whose names split into the same key
//! (see [`split_key`]) in a row form one [`Sample`]; a sample is complete when the key changes
//! or the archive ends. A header that fails its checksum or a stream that stops inside a member
//! ends the parse with a [`TarError`]: samples completed before it are kept, the sample being
//! grouped is dropped (it may be missing members).
//!
//! [`TarBuilder`] writes ustar archives (GNU long names past 100 bytes) for synthetic data and
//! tests.

use crate::sample::Sample;
use bytes::Bytes;
use std::fmt;

const BLOCK: usize = 512;
/// Cap on what a header's size field may make us reserve up front; a corrupt header can claim
/// gigabytes, so beyond this the buffer grows only as bytes actually arrive.
const MAX_PREALLOC: u64 = 16 << 20;
/// GNU long names and pax headers are metadata, not payload: anything this large is corrupt.
const MAX_META_MEMBER: u64 = 1 << 20;

/// Why a tar stream could not be parsed to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarErrorKind {
    /// The header block's checksum does not match its contents.
    BadChecksum { stored: u64, computed: u64 },
    /// A header field could not be parsed (size, long name, pax record).
    BadHeader(String),
    /// The stream ended inside a header or a member's data.
    Truncated,
}

/// A parse failure, with where it happened and which sample it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarError {
    pub shard: String,
    /// Byte offset in the archive of the block that failed (or of the end, when truncated).
    pub offset: u64,
    pub kind: TarErrorKind,
    /// Key of the sample that was being grouped and had to be dropped, if any.
    pub dropped_key: Option<String>,
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            TarErrorKind::BadChecksum { stored, computed } => write!(
                f,
                "tar header checksum mismatch at byte {} of {} (stored {stored}, computed {computed})",
                self.offset, self.shard
            )?,
            TarErrorKind::BadHeader(what) => write!(
                f,
                "corrupt tar header at byte {} of {}: {what}",
                self.offset, self.shard
            )?,
            TarErrorKind::Truncated => write!(
                f,
                "tar stream of {} ends inside a member at byte {}",
                self.shard, self.offset
            )?,
        }
        if let Some(key) = &self.dropped_key {
            write!(f, "; dropped partial sample {key:?}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TarError {}

/// Splits a member path into (key, extension) exactly like WebDataset's `base_plus_ext`, i.e.
/// the regex `^((?:.*/|)[^.]+)[.]([^/]*)$`: the key runs to the first dot of the file name, the
/// extension is everything after it (`dir.v1/abc.seg.png` → `dir.v1/abc`, `seg.png`). Returns
/// `None` where the regex does not match (no dot in the file name, for one); such members are
/// skipped. The extension is returned as stored; callers lower-case it.
pub fn split_key(path: &str) -> Option<(&str, &str)> {
    // The regex engine tries the longest `(?:.*/|)` prefix first and backtracks to shorter
    // ones, so candidate key starts are: after each '/', last one first, then 0.
    let bytes = path.as_bytes();
    let slash_starts = bytes
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'/')
        .map(|(i, _)| i + 1);
    for start in slash_starts.chain(std::iter::once(0)) {
        // `.` in `.*/` does not match a newline.
        if path[..start].contains('\n') {
            continue;
        }
        let Some(dot) = path[start..].find('.').map(|i| i + start) else {
            continue;
        };
        if dot == start || path[dot + 1..].contains('/') {
            continue;
        }
        return Some((&path[..dot], &path[dot + 1..]));
    }
    None
}

/// WebDataset skips `__name__` metadata members (`tar_file_iterator`'s `skip_meta`).
fn is_meta_member(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("__") else {
        return false;
    };
    let first = rest.split('/').next().unwrap_or("");
    first.len() >= 2 && first.ends_with("__")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberKind {
    /// A file that becomes part of a sample.
    Regular,
    /// GNU `././@LongLink` body: the next header's name.
    LongName,
    /// pax extended header for the next member.
    Pax,
    /// Data that is read past: global pax headers, long link names, unknown types.
    Skip,
}

#[derive(Debug)]
enum State {
    /// Filling `header` (`filled` bytes so far).
    Header,
    /// Reading `remaining` data bytes of a member, then `padding` bytes to the block boundary.
    Data {
        kind: MemberKind,
        name: String,
        remaining: u64,
        padding: u64,
        buf: Vec<u8>,
    },
    /// After the end-of-archive block (or a fatal error): everything else is ignored.
    Done,
}

/// Push-based tar → [`Sample`] parser for one shard.
pub struct TarStreamParser {
    shard: String,
    state: State,
    header: [u8; BLOCK],
    filled: usize,
    /// Bytes consumed so far; the archive offset of the next byte.
    offset: u64,
    /// Offset where the member being read (or its metadata headers) began.
    member_start: u64,
    long_name: Option<String>,
    pax_path: Option<String>,
    pax_size: Option<u64>,
    current: Option<Sample>,
    duplicate_members: u64,
}

impl TarStreamParser {
    /// `shard` names the archive in samples and errors (its URL).
    pub fn new(shard: impl Into<String>) -> Self {
        Self {
            shard: shard.into(),
            state: State::Header,
            header: [0; BLOCK],
            filled: 0,
            offset: 0,
            member_start: 0,
            long_name: None,
            pax_path: None,
            pax_size: None,
            current: None,
            duplicate_members: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// True once the end-of-archive marker was read or a fatal error was reported; later input
    /// is ignored (archives are commonly padded to a 10 KiB record after the marker).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Members whose key and extension repeated inside one sample; the first copy is kept.
    pub fn duplicate_members(&self) -> u64 {
        self.duplicate_members
    }

    /// Feeds the next bytes of the archive. Completed samples are appended to `out`, even when
    /// an error is returned after them. After an error the parser is done.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<Sample>) -> Result<(), TarError> {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Done => {
                    self.offset += chunk.len() as u64;
                    return Ok(());
                }
                State::Header => {
                    let take = (BLOCK - self.filled).min(chunk.len());
                    self.header[self.filled..self.filled + take].copy_from_slice(&chunk[..take]);
                    self.filled += take;
                    self.offset += take as u64;
                    chunk = &chunk[take..];
                    if self.filled == BLOCK {
                        self.filled = 0;
                        self.on_header(out)?;
                    }
                }
                State::Data {
                    remaining,
                    padding,
                    buf,
                    ..
                } => {
                    if *remaining > 0 {
                        let take = (*remaining).min(chunk.len() as u64) as usize;
                        buf.extend_from_slice(&chunk[..take]);
                        *remaining -= take as u64;
                        self.offset += take as u64;
                        chunk = &chunk[take..];
                    }
                    if *remaining == 0 {
                        let take = (*padding).min(chunk.len() as u64) as usize;
                        *padding -= take as u64;
                        self.offset += take as u64;
                        chunk = &chunk[take..];
                        if *padding == 0 {
                            self.on_member_end()?;
                        }
                    }
                }
            }
        }
        // A member with no data and no padding completes without further input.
        if let State::Data {
            remaining: 0,
            padding: 0,
            ..
        } = self.state
        {
            self.on_member_end()?;
        }
        Ok(())
    }

    /// Signals the end of input. Succeeds only after the end-of-archive marker; otherwise the
    /// stream was cut (possibly at a member boundary, where the last sample may still be
    /// missing members), so the sample being grouped is dropped and truncation reported.
    /// An archive that is empty (zero bytes) is accepted and holds no samples.
    pub fn finish(&mut self) -> Result<(), TarError> {
        match &self.state {
            State::Done => Ok(()),
            State::Header if self.offset == 0 => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(self.fail(self.offset, TarErrorKind::Truncated)),
        }
    }

    fn fail(&mut self, offset: u64, kind: TarErrorKind) -> TarError {
        self.state = State::Done;
        TarError {
            shard: self.shard.clone(),
            offset,
            kind,
            dropped_key: self.current.take().map(|s| s.key),
        }
    }

    fn flush_current(&mut self, out: &mut Vec<Sample>) {
        if let Some(sample) = self.current.take() {
            out.push(sample);
        }
    }

    fn on_header(&mut self, out: &mut Vec<Sample>) -> Result<(), TarError> {
        let block_offset = self.offset - BLOCK as u64;
        let h = self.header;
        if h.iter().all(|b| *b == 0) {
            // Like Python's tarfile (without ignore_zeros), the first zero block ends the
            // archive; the second one of the standard marker needs no checking.
            if self.long_name.is_some() || self.pax_path.is_some() || self.pax_size.is_some() {
                return Err(self.fail(
                    block_offset,
                    TarErrorKind::BadHeader("archive ends after a long-name/pax header".into()),
                ));
            }
            self.flush_current(out);
            self.state = State::Done;
            return Ok(());
        }
        let stored = parse_numeric(&h[148..156]).map_err(|e| {
            self.fail(
                block_offset,
                TarErrorKind::BadHeader(format!("checksum field: {e}")),
            )
        })?;
        let (unsigned, signed) = header_checksums(&h);
        // Some old writers summed signed bytes; tarfile accepts either.
        if stored != unsigned && stored as i64 != signed {
            return Err(self.fail(
                block_offset,
                TarErrorKind::BadChecksum {
                    stored,
                    computed: unsigned,
                },
            ));
        }
        if self.long_name.is_none() && self.pax_path.is_none() && self.pax_size.is_none() {
            self.member_start = block_offset;
        }
        let typeflag = h[156];
        let header_size = parse_numeric(&h[124..136]).map_err(|e| {
            self.fail(
                block_offset,
                TarErrorKind::BadHeader(format!("size field: {e}")),
            )
        })?;
        let kind = match typeflag {
            b'0' | 0 | b'7' => MemberKind::Regular,
            b'L' => MemberKind::LongName,
            b'x' => MemberKind::Pax,
            _ => MemberKind::Skip,
        };
        // Hard links, symlinks, devices, directories and FIFOs carry no data blocks whatever
        // their size field says (tarfile's rule); any other type is followed by `size` bytes.
        let has_data = !matches!(typeflag, b'1'..=b'6');
        let size = match kind {
            MemberKind::Regular => self.pax_size.take().unwrap_or(header_size),
            _ if has_data => header_size,
            _ => 0,
        };
        if matches!(kind, MemberKind::LongName | MemberKind::Pax) && size > MAX_META_MEMBER {
            return Err(self.fail(
                block_offset,
                TarErrorKind::BadHeader(format!("metadata member of {size} bytes")),
            ));
        }
        let name = if kind == MemberKind::Regular || kind == MemberKind::Skip {
            let header_name = header_path(&h);
            let name = self
                .pax_path
                .take()
                .or_else(|| self.long_name.take())
                .unwrap_or(header_name);
            if !matches!(typeflag, b'0' | 0 | b'7') {
                // Metadata applies only to the member that follows it.
                self.pax_size = None;
            }
            name
        } else {
            String::new()
        };
        if kind == MemberKind::Regular {
            self.start_member(&name, out);
        }
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        let keep = matches!(
            kind,
            MemberKind::Regular | MemberKind::LongName | MemberKind::Pax
        );
        let buf = if keep {
            Vec::with_capacity(size.min(MAX_PREALLOC) as usize)
        } else {
            Vec::new()
        };
        self.state = State::Data {
            kind,
            name,
            remaining: size,
            padding,
            buf,
        };
        Ok(())
    }

    fn on_member_end(&mut self) -> Result<(), TarError> {
        let State::Data {
            kind, name, buf, ..
        } = std::mem::replace(&mut self.state, State::Header)
        else {
            return Ok(());
        };
        match kind {
            MemberKind::Skip => {}
            MemberKind::LongName => {
                let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
                self.long_name = Some(String::from_utf8_lossy(&buf[..end]).into_owned());
            }
            MemberKind::Pax => {
                let records = parse_pax(&buf).map_err(|e| {
                    self.fail(
                        self.member_start,
                        TarErrorKind::BadHeader(format!("pax header: {e}")),
                    )
                })?;
                for (k, v) in records {
                    match k.as_str() {
                        "path" => self.pax_path = Some(v),
                        "size" => {
                            let size = v.trim().parse().map_err(|_| {
                                self.fail(
                                    self.member_start,
                                    TarErrorKind::BadHeader(format!("pax size {v:?}")),
                                )
                            })?;
                            self.pax_size = Some(size);
                        }
                        _ => {}
                    }
                }
            }
            MemberKind::Regular => self.add_member(name, buf),
        }
        Ok(())
    }

    /// Member names in WebDataset terms: `None` for members that belong to no sample.
    fn member_key(name: &str) -> Option<(&str, &str)> {
        if name.is_empty() || is_meta_member(name) {
            return None;
        }
        split_key(name)
    }

    /// Called at a regular member's header: a new key completes the previous sample right away,
    /// so a stream cut inside this member costs only this member's sample.
    fn start_member(&mut self, name: &str, out: &mut Vec<Sample>) {
        let Some((key, _)) = Self::member_key(name) else {
            return;
        };
        if self.current.as_ref().is_some_and(|s| s.key != key) {
            self.flush_current(out);
        }
        if self.current.is_none() {
            self.current = Some(Sample {
                key: key.to_string(),
                shard: self.shard.clone(),
                members: Default::default(),
            });
        }
    }

    fn add_member(&mut self, name: String, data: Vec<u8>) {
        let Some((_, ext)) = Self::member_key(&name) else {
            tracing::debug!(shard = %self.shard, member = %name, "skipping tar member that is not part of a sample");
            return;
        };
        let ext = ext.to_lowercase();
        // `start_member` opened this member's sample when its header was read.
        let Some(sample) = self.current.as_mut() else {
            return;
        };
        if sample.members.contains_key(&ext) {
            // WebDataset raises here; its skip-and-continue handlers keep the first copy.
            self.duplicate_members += 1;
            tracing::warn!(shard = %self.shard, member = %name, "duplicate member in sample; keeping the first");
            return;
        }
        sample.members.insert(ext, Bytes::from(data));
    }
}

/// The header checksum computed as unsigned and as signed byte sums, with the checksum field
/// itself counted as eight spaces.
fn header_checksums(h: &[u8; BLOCK]) -> (u64, i64) {
    let mut unsigned = 0u64;
    let mut signed = 0i64;
    for (i, b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { *b };
        unsigned += b as u64;
        signed += b as i8 as i64;
    }
    (unsigned, signed)
}

/// Parses an octal numeric field (NUL/space padded), or GNU base-256 when the high bit is set.
fn parse_numeric(field: &[u8]) -> Result<u64, String> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return Err("negative base-256 value".into());
        }
        let mut v: u64 = (field[0] & 0x3f) as u64;
        for b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(*b as u64))
                .ok_or("base-256 value overflows")?;
        }
        return Ok(v);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ' || *b == 0)
        .take_while(|b| *b != b' ' && *b != 0)
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    let s = std::str::from_utf8(&text).map_err(|_| format!("non-ASCII number {text:?}"))?;
    u64::from_str_radix(s, 8).map_err(|_| format!("not an octal number: {s:?}"))
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// The member path from the header alone: `prefix/name` for POSIX ustar, `name` otherwise
/// (GNU headers use the prefix bytes for other fields).
fn header_path(h: &[u8; BLOCK]) -> String {
    let name = cstr(&h[0..100]);
    if &h[257..263] == b"ustar\0" {
        let prefix = cstr(&h[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// Parses pax records: `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn parse_pax(mut data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|b| *b == 0) {
            break;
        }
        let space = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or("record without a length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("bad record length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(format!("record length {len} does not fit"));
        }
        let record = &data[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or("record without '='")?;
        out.push((
            String::from_utf8_lossy(&record[..eq]).into_owned(),
            String::from_utf8_lossy(&record[eq + 1..]).into_owned(),
        ));
        data = &data[len..];
    }
    Ok(out)
}

/// Writes a tar archive in memory: ustar headers, GNU `././@LongLink` for names past 100 bytes,
/// fixed mtime/mode so the same members always give the same bytes.
#[derive(Default)]
pub struct TarBuilder {
    buf: Vec<u8>,
}

impl TarBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes written so far (without the end-of-archive marker).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends a regular file member.
    pub fn append(&mut self, path: &str, data: &[u8]) {
        let name = path.as_bytes();
        if name.len() > 100 {
            let mut long = name.to_vec();
            long.push(0);
            self.append_raw(b"././@LongLink", b'L', &long);
        }
        self.append_raw(&name[..name.len().min(100)], b'0', data);
    }

    /// Appends a member with an explicit type flag and a name of at most 100 bytes (longer
    /// names are cut); for tests that need directories, links or pax headers.
    pub fn append_raw(&mut self, name: &[u8], typeflag: u8, data: &[u8]) {
        let mut h = [0u8; BLOCK];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        write_octal(&mut h[100..108], 0o644);
        write_octal(&mut h[108..116], 0);
        write_octal(&mut h[116..124], 0);
        write_octal(&mut h[124..136], data.len() as u64);
        write_octal(&mut h[136..148], 0);
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let (sum, _) = header_checksums(&h);
        // Six octal digits, NUL, space: the traditional layout.
        let digits = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(digits.as_bytes());
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(data);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.buf.resize(self.buf.len() + pad, 0);
    }

    /// Appends the end-of-archive marker and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.resize(self.buf.len() + 2 * BLOCK, 0);
        self.buf
    }

    /// The archive so far, without the end-of-archive marker (for truncation tests).
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

/// Zero-padded octal with a trailing NUL, filling the field.
fn write_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    let bytes = s.as_bytes();
    // Values too large for the field use GNU base-256.
    if bytes.len() > width {
        field.fill(0);
        let mut v = value;
        for b in field.iter_mut().rev() {
            *b = (v & 0xff) as u8;
            v >>= 8;
        }
        field[0] |= 0x80;
        return;
    }
    field[..width].copy_from_slice(bytes);
    field[width] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(data: &[u8], chunk: usize) -> (Vec<Sample>, Result<(), TarError>) {
        let mut p = TarStreamParser::new("mem://t.tar");
        let mut out = Vec::new();
        for c in data.chunks(chunk.max(1)) {
            if let Err(e) = p.push(c, &mut out) {
                return (out, Err(e));
            }
        }
        let r = p.finish();
        (out, r)
    }

    fn keys(samples: &[Sample]) -> Vec<String> {
        samples.iter().map(|s| s.key.clone()).collect()
    }

    #[test]
    fn split_key_follows_webdataset_regex() {
        assert_eq!(split_key("abc.jpg"), Some(("abc", "jpg")));
        assert_eq!(split_key("dir/abc.def.jpg"), Some(("dir/abc", "def.jpg")));
        assert_eq!(split_key("d.v1/x/abc.JPG"), Some(("d.v1/x/abc", "JPG")));
        // A dot-file name backtracks to a key that ends in '/'.
        assert_eq!(split_key("a/.hidden.jpg"), Some(("a/", "hidden.jpg")));
        assert_eq!(split_key("noext"), None);
        assert_eq!(split_key("a.b/noext"), None);
        assert_eq!(split_key(".jpg"), None);
        assert_eq!(split_key("dir.x/.hidden.jpg"), None);
    }

    #[test]
    fn meta_members_are_recognised() {
        assert!(is_meta_member("__meta__"));
        assert!(is_meta_member("__meta__/x.json"));
        assert!(!is_meta_member("__init.py"));
        assert!(!is_meta_member("a/__meta__"));
    }

    fn three_samples() -> Vec<u8> {
        let mut b = TarBuilder::new();
        b.append("s0.jpg", &[1u8; 700]);
        b.append("s0.txt", b"zero");
        b.append("d/s1.JPG", &[2u8; 512]);
        b.append("d/s1.cls", b"1");
        b.append("s2.seg.png", &[3u8; 3]);
        b.finish()
    }

    #[test]
    fn groups_members_for_every_chunk_size() {
        let data = three_samples();
        let (want, r) = parse_all(&data, data.len());
        r.unwrap();
        assert_eq!(keys(&want), ["s0", "d/s1", "s2"]);
        assert_eq!(want[0].members["jpg"].as_ref(), &[1u8; 700][..]);
        assert_eq!(want[0].members["txt"].as_ref(), b"zero");
        assert_eq!(
            want[1].members["jpg"].len(),
            512,
            "extension is lower-cased"
        );
        assert_eq!(want[2].members["seg.png"].as_ref(), &[3u8; 3]);
        for chunk in [1, 7, 511, 512, 513, 1000, 4096] {
            let (got, r) = parse_all(&data, chunk);
            r.unwrap();
            assert_eq!(got, want, "chunk size {chunk}");
        }
    }

    #[test]
    fn trailing_record_padding_is_ignored() {
        let mut data = three_samples();
        data.resize(10240 * 2, 0);
        let (got, r) = parse_all(&data, 999);
        r.unwrap();
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn a_stream_cut_at_a_member_boundary_is_truncated() {
        let mut b = TarBuilder::new();
        b.append("a.jpg", b"x");
        b.append("b.jpg", b"y");
        let (got, r) = parse_all(&b.into_inner(), 100);
        let e = r.unwrap_err();
        assert_eq!(e.kind, TarErrorKind::Truncated);
        assert_eq!(
            e.dropped_key.as_deref(),
            Some("b"),
            "b.txt may have followed"
        );
        assert_eq!(keys(&got), ["a"]);
        let (got, r) = parse_all(&[], 1);
        r.unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn truncation_keeps_earlier_samples_and_drops_the_partial_one() {
        let data = three_samples();
        // Cut inside the data of d/s1.jpg (third member).
        let cut = 512 + 1024 + 512 + 512 + 512 + 100;
        let (got, r) = parse_all(&data[..cut], 300);
        let e = r.unwrap_err();
        assert_eq!(e.kind, TarErrorKind::Truncated);
        assert_eq!(e.dropped_key.as_deref(), Some("d/s1"));
        assert_eq!(keys(&got), ["s0"]);
        // Cut inside a header.
        let (got, r) = parse_all(&data[..512 + 1024 + 100], 64);
        assert_eq!(r.unwrap_err().kind, TarErrorKind::Truncated);
        assert!(
            got.is_empty(),
            "s0 was not complete yet: its .txt may follow"
        );
    }

    #[test]
    fn bad_checksum_stops_the_parse() {
        let mut data = three_samples();
        let second_sample_header = 512 + 1024 + 512 + 512;
        data[second_sample_header + 5] ^= 0x20;
        let (got, r) = parse_all(&data, 4096);
        let e = r.unwrap_err();
        assert!(matches!(e.kind, TarErrorKind::BadChecksum { .. }), "{e}");
        assert_eq!(e.offset, second_sample_header as u64);
        assert_eq!(e.dropped_key.as_deref(), Some("s0"));
        assert!(got.is_empty());
        assert!(e.to_string().contains("mem://t.tar"), "{e}");
    }

    #[test]
    fn long_names_pax_paths_and_non_regular_members() {
        let long_dir = "x".repeat(120);
        let mut b = TarBuilder::new();
        b.append_raw(b"somedir/", b'5', b"");
        b.append(&format!("{long_dir}/k1.jpg"), b"gnu");
        b.append_raw(b"link.jpg", b'2', b"");
        let pax_path = format!("{}/k2.jpg", "p".repeat(150));
        let record = format!(" path={pax_path}\n");
        let len = record.len() + 3; // three-digit length prefix
        let pax = format!("{len}{record}");
        assert_eq!(pax.len(), len);
        b.append_raw(b"PaxHeaders/k2.jpg", b'x', pax.as_bytes());
        b.append_raw(b"truncated-name.jpg", b'0', b"pax");
        b.append_raw(b"__meta__", b'0', b"{}");
        b.append_raw(b"global", b'g', b"20 comment=ignored\n");
        b.append("k3.txt", b"plain");
        let data = b.finish();
        for chunk in [1, 100, 100_000] {
            let (got, r) = parse_all(&data, chunk);
            r.unwrap();
            assert_eq!(
                keys(&got),
                [
                    format!("{long_dir}/k1"),
                    format!("{}/k2", "p".repeat(150)),
                    "k3".into()
                ]
            );
            assert_eq!(got[0].members["jpg"].as_ref(), b"gnu");
            assert_eq!(got[1].members["jpg"].as_ref(), b"pax");
        }
    }

    #[test]
    fn ustar_prefix_is_joined() {
        let mut b = TarBuilder::new();
        b.append_raw(b"k.jpg", b'0', b"v");
        let mut data = b.finish();
        data[345..348].copy_from_slice(b"pre");
        let (sum, _) = header_checksums(data[..512].try_into().unwrap());
        data[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let (got, r) = parse_all(&data, 512);
        r.unwrap();
        assert_eq!(keys(&got), ["pre/k"]);
    }

    #[test]
    fn duplicate_extension_keeps_first() {
        let mut b = TarBuilder::new();
        b.append("a.txt", b"first");
        b.append("a.TXT", b"second");
        let mut p = TarStreamParser::new("t");
        let mut out = Vec::new();
        p.push(&b.finish(), &mut out).unwrap();
        p.finish().unwrap();
        assert_eq!(out[0].members["txt"].as_ref(), b"first");
        assert_eq!(p.duplicate_members(), 1);
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"00000001750\0"), Ok(1000));
        assert_eq!(parse_numeric(b"  1750 \0"), Ok(1000));
        assert_eq!(parse_numeric(b"\0\0\0"), Ok(0));
        assert!(parse_numeric(b"12x4\0").is_err());
        let mut f = [0u8; 12];
        write_octal(&mut f, 1 << 40);
        assert_eq!(f[0] & 0x80, 0x80, "too large for 11 octal digits");
        assert_eq!(parse_numeric(&f), Ok(1 << 40));
    }

    #[test]
    fn absurd_metadata_size_is_rejected_without_allocating() {
        let mut b = TarBuilder::new();
        b.append_raw(b"././@LongLink", b'L', b"x");
        let mut data = b.finish();
        write_octal(&mut data[124..136], 1 << 40);
        data[148..156].fill(b' ');
        let (sum, _) = header_checksums(data[..512].try_into().unwrap());
        data[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let (_, r) = parse_all(&data, 512);
        assert!(matches!(r.unwrap_err().kind, TarErrorKind::BadHeader(_)));
    }
}
