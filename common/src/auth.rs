//! The job token: a secret shared by the coordinator and the workers of one job, so that a
//! process that lacks it can neither call the coordinator nor join the collective.
//!
//! The token never crosses the network. Every gRPC call carries a one-time proof in the
//! `x-contrail-auth` header (a timestamp, a random nonce and an HMAC-SHA256 of both under the
//! token); the coordinator checks the MAC, the clock window and that the nonce was not seen
//! before, so a captured header cannot be replayed. The collective's TCP handshake is a mutual
//! challenge–response over fresh nonces (`contrail_worker::dist::tcp`).
//!
//! Where the token comes from: `contrail local` generates one per run; `contrail k8s render`
//! puts one in a Kubernetes Secret that the pods read as `CONTRAIL_JOB_TOKEN`; elsewhere the
//! environment. Never the job file, which is shown on `/status` and copied around.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Mutex;

/// The environment variable the coordinator and workers read the token from.
pub const TOKEN_ENV: &str = "CONTRAIL_JOB_TOKEN";
/// The gRPC metadata key that carries the per-call proof.
pub const GRPC_HEADER: &str = "x-contrail-auth";
/// How far a call's timestamp may be from the coordinator's clock (both ways).
pub const GRPC_WINDOW_MS: u64 = 5 * 60 * 1000;
/// A token must be at least this long: shorter ones can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// A job's shared secret. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken {
    text: String,
    key: [u8; 32],
}

impl fmt::Debug for JobToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobToken(<{} characters, hidden>)", self.text.len())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "the job token is {0} characters long; it needs at least {MIN_TOKEN_LEN} \
         (`contrail token` prints a fresh one)"
    )]
    TooShort(usize),
    #[error("the job token holds whitespace or control characters")]
    BadCharacters,
    #[error(
        "no job token: set {TOKEN_ENV} (`contrail token` prints a fresh one; `contrail local` \
         makes its own, and `contrail k8s render` puts one in a Secret)"
    )]
    Missing,
    #[error("could not draw random bytes for a token or nonce: {0}")]
    Random(String),
}

impl JobToken {
    /// Accepts any printable string of at least [`MIN_TOKEN_LEN`] characters (a Secret may
    /// hold whatever the operator chose). The MAC key is SHA-256 of it.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim_end_matches(['\n', '\r']);
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenError::BadCharacters);
        }
        if text.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort(text.len()));
        }
        let mut h = Sha256::new();
        h.update(b"contrail job token v1\0");
        h.update(text.as_bytes());
        Ok(Self {
            text: text.to_string(),
            key: h.finalize().into(),
        })
    }

    /// 32 random bytes as 64 hex digits.
    pub fn generate() -> Result<Self, TokenError> {
        let bytes: [u8; 32] = random_bytes()?;
        Self::parse(&hex(&bytes))
    }

    /// The token from [`TOKEN_ENV`]; `Ok(None)` when the variable is unset or empty.
    pub fn from_env() -> Result<Option<Self>, TokenError> {
        match std::env::var(TOKEN_ENV) {
            Ok(v) if !v.is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// [`JobToken::from_env`], with a missing token an error.
    pub fn require_env() -> Result<Self, TokenError> {
        Self::from_env()?.ok_or(TokenError::Missing)
    }

    /// The token's text, to hand to a child process's environment. Never log it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// HMAC-SHA256 under the token of the parts, each prefixed by its length so that no two
    /// different part lists give the same input.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.hmac_of(parts).finalize().into_bytes().into()
    }

    /// A short public name of the run this token belongs to (a MAC under it, so the token
    /// stays secret): checkpoints record it, so a job tells its own checkpoints from an
    /// earlier run's.
    pub fn run_id(&self) -> String {
        hex(&self.mac(&[b"contrail run id"])[..8])
    }

    /// Whether `tag` is the MAC of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.hmac_of(parts).verify_slice(tag).is_ok()
    }

    fn hmac_of(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// A fresh proof for one gRPC call: `<unix ms>.<nonce hex>.<mac hex>`.
    pub fn grpc_proof(&self, now_ms: u64) -> Result<String, TokenError> {
        let nonce: [u8; 16] = random_bytes()?;
        let ts = now_ms.to_string();
        let tag = self.mac(&[b"grpc", ts.as_bytes(), &nonce]);
        Ok(format!("{ts}.{}.{}", hex(&nonce), hex(&tag)))
    }
}

/// Checks gRPC proofs and remembers the nonces of the clock window, so each proof is good once.
pub struct GrpcGuard {
    token: JobToken,
    seen: Mutex<Seen>,
}

/// The nonces of accepted proofs, and when each arrived (oldest first) so they can be
/// forgotten once no proof with that nonce could pass the clock check any more.
#[derive(Default)]
struct Seen {
    nonces: HashSet<[u8; 16]>,
    arrivals: VecDeque<(u64, [u8; 16])>,
}

impl GrpcGuard {
    pub fn new(token: JobToken) -> Self {
        Self {
            token,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Ok when `header` is a fresh, valid proof made with this job's token; else why not (for
    /// the log; the caller answers only "unauthenticated").
    pub fn check(&self, header: Option<&str>, now_ms: u64) -> Result<(), String> {
        let header = header.ok_or_else(|| format!("no {GRPC_HEADER} header (no job token?)"))?;
        let mut it = header.split('.');
        let (Some(ts), Some(nonce), Some(tag), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(format!("malformed {GRPC_HEADER} header"));
        };
        let ms: u64 = ts
            .parse()
            .map_err(|_| format!("malformed timestamp in {GRPC_HEADER}"))?;
        let nonce: [u8; 16] = unhex(nonce)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| format!("malformed nonce in {GRPC_HEADER}"))?;
        let tag = unhex(tag).ok_or_else(|| format!("malformed MAC in {GRPC_HEADER}"))?;
        if !self.token.verify(&[b"grpc", ts.as_bytes(), &nonce], &tag) {
            return Err("wrong job token (the proof's MAC does not match)".into());
        }
        if ms.abs_diff(now_ms) > GRPC_WINDOW_MS {
            return Err(format!(
                "the proof is {} s away from this coordinator's clock (at most {} s allowed): \
                 replayed, or the clocks disagree",
                ms.abs_diff(now_ms) / 1000,
                GRPC_WINDOW_MS / 1000
            ));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // A proof accepted at time a carried a timestamp within a ± window, so after
        // a + 2 × window it fails the clock check anyway: its nonce can be forgotten.
        while let Some(&(at, old)) = seen.arrivals.front() {
            if at.saturating_add(2 * GRPC_WINDOW_MS) >= now_ms {
                break;
            }
            seen.arrivals.pop_front();
            seen.nonces.remove(&old);
        }
        if !seen.nonces.insert(nonce) {
            return Err("a replayed proof (its nonce was used before)".into());
        }
        seen.arrivals.push_back((now_ms, nonce));
        Ok(())
    }
}

/// The client side: a tonic interceptor that stamps every call with a fresh proof. Without a
/// token it sends nothing (the coordinator then refuses the call, unless it is open).
#[derive(Clone, Debug, Default)]
pub struct GrpcProof {
    token: Option<JobToken>,
}

impl GrpcProof {
    pub fn new(token: Option<JobToken>) -> Self {
        Self { token }
    }
}

impl tonic::service::Interceptor for GrpcProof {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.token {
            let proof = token
                .grpc_proof(unix_ms())
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            let value = proof
                .parse()
                .map_err(|_| tonic::Status::internal("a proof that is not ASCII"))?;
            req.metadata_mut().insert(GRPC_HEADER, value);
        }
        Ok(req)
    }
}

/// Milliseconds since the Unix epoch (the clock gRPC proofs are stamped and checked with).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], TokenError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(b)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> JobToken {
        JobToken::parse(s).unwrap()
    }

    #[test]
    fn parse_refuses_short_and_blank_tokens() {
        assert_eq!(JobToken::parse("short"), Err(TokenError::TooShort(5)));
        assert_eq!(
            JobToken::parse("has a space in it, long enough"),
            Err(TokenError::BadCharacters)
        );
        // A trailing newline (a Secret written by `echo`) is not part of the token.
        assert_eq!(token("0123456789abcdef\n"), token("0123456789abcdef"));
    }

    #[test]
    fn generated_tokens_differ_and_never_print() {
        let a = JobToken::generate().unwrap();
        let b = JobToken::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn mac_depends_on_token_and_on_part_boundaries() {
        let t = token("0123456789abcdef");
        let tag = t.mac(&[b"ab", b"c"]);
        assert!(t.verify(&[b"ab", b"c"], &tag));
        assert!(!t.verify(&[b"a", b"bc"], &tag));
        assert!(!token("0123456789abcdeX").verify(&[b"ab", b"c"], &tag));
    }

    #[test]
    fn grpc_proof_is_good_once_within_the_window_and_only_with_the_token() {
        let t = token("the-job-token-of-this-test");
        let guard = GrpcGuard::new(t.clone());
        let now = 1_800_000_000_000;
        let p = t.grpc_proof(now).unwrap();
        assert_eq!(guard.check(Some(&p), now + 1000), Ok(()));
        assert!(guard
            .check(Some(&p), now + 2000)
            .unwrap_err()
            .contains("replayed"));

        let late = t.grpc_proof(now).unwrap();
        assert!(guard
            .check(Some(&late), now + GRPC_WINDOW_MS + 1)
            .unwrap_err()
            .contains("clock"));

        let foreign = token("some-other-jobs-token").grpc_proof(now).unwrap();
        assert!(guard
            .check(Some(&foreign), now)
            .unwrap_err()
            .contains("wrong job token"));
        assert!(guard
            .check(None, now)
            .unwrap_err()
            .contains("no x-contrail-auth"));
        for junk in ["", "...", "1.2.3", "x.00.00", "1.zz.00", "1.2.3.4"] {
            assert!(guard.check(Some(junk), now).is_err(), "{junk:?} passed");
        }
    }
}
