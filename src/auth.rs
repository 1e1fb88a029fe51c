//! Bearer tokens: which door needs which token, and the check.
//!
//! Three doors, each with its own token read from a file: ingest (OTLP over gRPC and HTTP), read
//! (`/api/v1/*` and Flight) and scrape (`/metrics`, `/internal/metrics`). A door without a token
//! file is open. `/-/healthy` and `/-/ready` are always open. One door's token never opens
//! another. Invariants: a token's bytes never reach a log or a `Debug` output, and the check
//! takes the same time whatever the expected token is (see [`same`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::telemetry::Telemetry;

/// `auth:` as written in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFiles {
    /// Token that OTLP exports (gRPC and HTTP) must carry.
    pub ingest_token_file: Option<PathBuf>,
    /// Token for `/api/v1/*` (snapshot, cardinality) and Flight.
    pub read_token_file: Option<PathBuf>,
    /// Token for `/metrics` and `/internal/metrics`; without it they stay open.
    pub scrape_token_file: Option<PathBuf>,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Ingest = 0,
    Read,
    Scrape,
}

impl Door {
    pub const ALL: [Door; 3] = [Door::Ingest, Door::Read, Door::Scrape];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Read => "read",
            Self::Scrape => "scrape",
        }
    }
}

/// Why a request was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer …` at all (or another scheme).
    Missing = 0,
    /// A bearer token that is not this door's.
    Wrong,
}

impl Denied {
    pub const ALL: [Denied; 2] = [Denied::Missing, Denied::Wrong];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Wrong => "wrong",
        }
    }
}

/// A token's bytes, never printed.
struct Secret(Box<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("auth.{key}: cannot read {path}: {cause}")]
    Read {
        key: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("auth.{key}: {path} holds no token")]
    Empty { key: &'static str, path: PathBuf },
    #[error(
        "auth.{key}: the token in {path} has characters an HTTP header cannot carry \
         (use printable ASCII)"
    )]
    Unsendable { key: &'static str, path: PathBuf },
}

/// The tokens of the three doors.
#[derive(Debug, Default)]
pub struct Tokens([Option<Secret>; 3]);

impl Tokens {
    /// Reads the token files (surrounding whitespace, such as a final newline, is not part of a
    /// token).
    pub fn load(files: &AuthFiles) -> Result<Self, TokenError> {
        let read = |key: &'static str, path: &Option<PathBuf>| -> Result<_, TokenError> {
            path.as_deref().map(|p| read_token(key, p)).transpose()
        };
        Ok(Self([
            read("ingest_token_file", &files.ingest_token_file)?,
            read("read_token_file", &files.read_token_file)?,
            read("scrape_token_file", &files.scrape_token_file)?,
        ]))
    }

    /// Whether `door` needs a token.
    pub fn guarded(&self, door: Door) -> bool {
        self.0[door as usize].is_some()
    }

    /// Checks an `Authorization` header value against `door`'s token.
    pub fn check(&self, door: Door, authorization: Option<&[u8]>) -> Result<(), Denied> {
        let Some(expected) = &self.0[door as usize] else {
            return Ok(());
        };
        let presented = authorization.and_then(bearer).ok_or(Denied::Missing)?;
        if same(presented, &expected.0) {
            Ok(())
        } else {
            Err(Denied::Wrong)
        }
    }
}

/// One door's check with its counter: what the listeners hold.
#[derive(Clone)]
pub struct Guard {
    tokens: Arc<Tokens>,
    door: Door,
    telemetry: Arc<Telemetry>,
}

impl Guard {
    pub fn new(tokens: Arc<Tokens>, door: Door, telemetry: Arc<Telemetry>) -> Self {
        Self {
            tokens,
            door,
            telemetry,
        }
    }

    /// Checks a request's `Authorization` value; a refusal is counted (the value is not kept).
    pub fn admit(&self, authorization: Option<&[u8]>) -> Result<(), Denied> {
        self.tokens
            .check(self.door, authorization)
            .inspect_err(|why| self.telemetry.denied(self.door, *why))
    }

    /// The reply's message: which door, never which token.
    pub fn message(&self) -> String {
        format!(
            "missing or wrong bearer token for {} (Authorization: Bearer <token>)",
            self.door.as_str()
        )
    }
}

/// On a gRPC service: refuses with UNAUTHENTICATED (not retryable) from the headers alone,
/// before the request body is read.
impl tonic::service::Interceptor for Guard {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = req.metadata().get("authorization").map(|v| v.as_bytes());
        match self.admit(value) {
            Ok(()) => Ok(req),
            Err(_) => Err(tonic::Status::unauthenticated(self.message())),
        }
    }
}

fn read_token(key: &'static str, path: &Path) -> Result<Secret, TokenError> {
    let bytes = std::fs::read(path).map_err(|cause| TokenError::Read {
        key,
        path: path.to_owned(),
        cause,
    })?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(TokenError::Empty {
            key,
            path: path.to_owned(),
        });
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::Unsendable {
            key,
            path: path.to_owned(),
        });
    }
    Ok(Secret(token.into()))
}

/// The token of a `Bearer` authorization (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether `presented` equals `expected`, in a time that depends only on `presented`'s length:
/// every presented byte is compared (against the expected token repeated), and the difference
/// is gathered without branching. Unlike a slice comparison, it returns neither at the first
/// differing byte nor at once for a wrong length, so timing tells an attacker nothing about the
/// expected token, not even its length.
fn same(presented: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut diff = u8::from(presented.len() != expected.len());
    for (i, b) in presented.iter().enumerate() {
        diff |= b ^ expected[i % expected.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ingest: &str) -> Tokens {
        Tokens([Some(Secret(ingest.as_bytes().into())), None, None])
    }

    #[test]
    fn only_the_doors_own_bearer_token_opens_it() {
        let t = tokens("s3cret-token");
        let check = |h: &str| t.check(Door::Ingest, Some(h.as_bytes()));
        assert_eq!(check("Bearer s3cret-token"), Ok(()));
        assert_eq!(check("bearer   s3cret-token "), Ok(()));
        assert_eq!(t.check(Door::Ingest, None), Err(Denied::Missing));
        assert_eq!(check("Basic czNjcmV0"), Err(Denied::Missing));
        assert_eq!(check("Bearer"), Err(Denied::Missing));
        assert_eq!(check("Bearers3cret-token"), Err(Denied::Missing));
        assert_eq!(
            check("Bearer s3cret-tokeN"),
            Err(Denied::Wrong),
            "same length"
        );
        assert_eq!(check("Bearer s3cret"), Err(Denied::Wrong), "a prefix");
        assert_eq!(check("Bearer s3cret-token-and-more"), Err(Denied::Wrong));
        assert_eq!(
            check("Bearer s3cret-tokens3cret-token"),
            Err(Denied::Wrong),
            "the token twice"
        );
        // A door without a token file is open.
        assert_eq!(t.check(Door::Read, None), Ok(()));
    }

    #[test]
    fn a_secret_never_prints() {
        let t = tokens("s3cret-token");
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
