//! Mints the HS256 bearer token the benchmark sends: the claims runbookd checks (`iss`, `aud`,
//! `sub`, `iat`, `exp`, `roles`), signed with the secret the benchmark gave the server.
#![forbid(unsafe_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::BenchError;

/// A token valid for `ttl_seconds` from now.
pub fn mint(
    secret: &[u8],
    issuer: &str,
    audience: &str,
    subject: &str,
    ttl_seconds: i64,
) -> Result<String, BenchError> {
    let now = chrono::Utc::now().timestamp();
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": now,
        "exp": now + ttl_seconds,
        "roles": ["developer"],
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret)
        .map_err(|e| BenchError::Server(format!("cannot key HMAC: {e}")))?;
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{signing_input}.{signature}"))
}
