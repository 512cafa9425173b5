//! IMDSv2 session tokens, issued and checked by the agent itself.
//!
//! A token is `<payload>.<tag>`: the payload holds the expiry and a digest of the subject
//! that asked, its pod UID and container ID ([`crate::identity::PodCgroup::subject`]; so
//! every token has the same short length), the tag is HMAC-SHA256 over it with the agent's
//! key. A token is only accepted from the container it was issued to, before its expiry:
//! containers of one pod may hold different roles. The key is kept in a file (created on first start, mode
//! 0600) so tokens survive agent restarts, as SDKs cache them for up to six hours.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// EC2's bounds for `X-aws-ec2-metadata-token-ttl-seconds`.
pub const MAX_TTL: u64 = 21_600;
const KEY_LEN: usize = 32;
/// Longer tokens are refused before any work (EC2's are ~56 characters).
const MAX_TOKEN_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("token key file {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("token key file {0} does not hold {KEY_LEN} bytes; delete it to make a new one")]
    BadLength(String),
    #[error("no randomness for a token key: {0}")]
    Random(getrandom::Error),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token was issued to another pod or container")]
    OtherPod,
}

/// Bytes of a subject's digest in a token.
const DIGEST_LEN: usize = 16;

/// Which pod and container a token is for: the start of SHA-256 of its subject.
fn subject_digest(subject: &str) -> [u8; DIGEST_LEN] {
    use sha2::Digest as _;
    let digest = Sha256::digest(subject.as_bytes());
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&digest[..DIGEST_LEN]);
    out
}

pub struct Tokens {
    key: [u8; KEY_LEN],
}

impl Tokens {
    /// Loads the key from `path`, creating it (0600) if missing.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let io = |source| KeyError::Io {
            path: shown.clone(),
            source,
        };
        match fs::read(path) {
            Ok(bytes) => {
                let key: [u8; KEY_LEN] = bytes
                    .try_into()
                    .map_err(|_| KeyError::BadLength(shown.clone()))?;
                Ok(Self { key })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let tokens = Self::random()?;
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir).map_err(io)?;
                }
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(&tokens.key).map_err(io)?;
                fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
                Ok(tokens)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A key that lives as long as the process.
    pub fn random() -> Result<Self, KeyError> {
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key).map_err(KeyError::Random)?;
        Ok(Self { key })
    }

    fn tag(&self, payload: &[u8]) -> Vec<u8> {
        // HMAC accepts keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(payload);
        mac.finalize().into_bytes().to_vec()
    }

    /// A token for `subject` valid for `ttl` (1 to 21600 seconds, checked by the caller).
    pub fn issue(&self, subject: &str, ttl: Duration) -> String {
        // Rounded up: a token never lives shorter than asked.
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d + ttl)
            .unwrap_or(ttl)
            .as_secs_f64()
            .ceil() as u64;
        self.issue_until(subject, expiry)
    }

    /// A token for `subject` that expires at `expiry` (Unix seconds).
    fn issue_until(&self, subject: &str, expiry: u64) -> String {
        let mut payload = expiry.to_be_bytes().to_vec();
        payload.extend_from_slice(&subject_digest(subject));
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(self.tag(&payload))
        )
    }

    /// Checks a token presented by `subject`.
    pub fn check(&self, token: &str, subject: &str) -> Result<(), TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&payload);
        mac.verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        let (expiry, uid) = payload.split_at_checked(8).ok_or(TokenError::Malformed)?;
        let expiry = u64::from_be_bytes(expiry.try_into().map_err(|_| TokenError::Malformed)?);
        let now = u64::try_from(kiam_ops::unix_now()).unwrap_or(0);
        if now >= expiry {
            return Err(TokenError::Expired);
        }
        if uid != subject_digest(subject) {
            return Err(TokenError::OtherPod);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_pod_and_expiry() {
        let tokens = Tokens::random().expect("key");
        let token = tokens.issue("pod-a", Duration::from_secs(60));
        assert_eq!(tokens.check(&token, "pod-a"), Ok(()));
        assert_eq!(tokens.check(&token, "pod-b"), Err(TokenError::OtherPod));
        let expired = tokens.issue_until("pod-a", 1_000_000);
        assert_eq!(tokens.check(&expired, "pod-a"), Err(TokenError::Expired));
        // Another agent's key, a flipped payload, garbage.
        let other = Tokens::random().expect("key");
        assert_eq!(other.check(&token, "pod-a"), Err(TokenError::BadSignature));
        let (payload, tag) = token.split_once('.').expect("dot");
        let mut forged = URL_SAFE_NO_PAD.decode(payload).expect("b64");
        forged[7] ^= 1;
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(forged));
        assert_eq!(
            tokens.check(&forged, "pod-a"),
            Err(TokenError::BadSignature)
        );
        for garbage in ["", "x", "a.b.c", &"A".repeat(1000)] {
            assert!(tokens.check(garbage, "pod-a").is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn every_issued_token_is_accepted_for_its_pod_whatever_the_uid() {
        // Found by the `token` fuzz target: a long UID made a token longer than `check`
        // accepts.
        let tokens = Tokens::random().expect("key");
        for pod in ["", "pod", &"\u{c2}".repeat(300), &"x".repeat(10_000)] {
            let token = tokens.issue(pod, Duration::from_secs(60));
            assert!(token.len() <= MAX_TOKEN_LEN, "{} bytes", token.len());
            assert_eq!(tokens.check(&token, pod), Ok(()), "{pod:?}");
        }
    }

    #[test]
    fn the_key_survives_restarts_and_is_private() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sub/key");
        let first = Tokens::from_file(&path).expect("create");
        let token = first.issue("pod", Duration::from_secs(60));
        let again = Tokens::from_file(&path).expect("load");
        assert_eq!(again.check(&token, "pod"), Ok(()));
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::write(&path, b"short").expect("write");
        assert!(Tokens::from_file(&path).is_err());
    }
}
