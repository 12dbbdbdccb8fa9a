//! Signed download links: a URL that lets a browser fetch one run's log (one stream or both)
//! for 60 seconds without a token in it. The signature is HMAC-SHA256 with the server's
//! secret over a purpose tag, the run id, the expiry and the stream, so it grants exactly that
//! download and nothing else.
#![forbid(unsafe_code)]

use hmac::{Hmac, Mac};
use sha2::Sha256;

use base64::Engine;

/// How long a minted link stays valid.
pub const LINK_TTL_SECONDS: i64 = 60;

const PURPOSE: &str = "runbookd-log-download-v1";

fn mac(secret: &[u8], run_id: &str, expires: i64, stream: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for part in [PURPOSE, run_id, &expires.to_string(), stream] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    mac
}

/// The signature for downloading `stream` ("" for both) of `run_id` until `expires` (Unix s).
pub fn sign(secret: &[u8], run_id: &str, expires: i64, stream: &str) -> String {
    let tag = mac(secret, run_id, expires, stream).finalize().into_bytes();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
}

/// Why a signed link is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkError {
    Expired,
    BadSignature,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Expired => f.write_str("this download link has expired; ask for a new one"),
            LinkError::BadSignature => f.write_str("this download link is not valid for this run"),
        }
    }
}

/// Checks a presented link (constant-time comparison of the signature).
pub fn verify(
    secret: &[u8],
    run_id: &str,
    expires: i64,
    stream: &str,
    sig: &str,
    now: i64,
) -> Result<(), LinkError> {
    let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else {
        return Err(LinkError::BadSignature);
    };
    mac(secret, run_id, expires, stream)
        .verify_slice(&tag)
        .map_err(|_| LinkError::BadSignature)?;
    if now > expires {
        return Err(LinkError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_grants_only_its_run_stream_and_time() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let sig = sign(secret, "r1-a", 1000, "");
        assert_eq!(verify(secret, "r1-a", 1000, "", &sig, 990), Ok(()));
        assert_eq!(
            verify(secret, "r1-a", 1000, "", &sig, 1001),
            Err(LinkError::Expired)
        );
        assert_eq!(
            verify(secret, "r1-b", 1000, "", &sig, 990),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            verify(secret, "r1-a", 1000, "stderr", &sig, 990),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            verify(secret, "r1-a", 2000, "", &sig, 990),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            verify(b"another secret", "r1-a", 1000, "", &sig, 990),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            verify(secret, "r1-a", 1000, "", "!!", 990),
            Err(LinkError::BadSignature)
        );
    }
}
