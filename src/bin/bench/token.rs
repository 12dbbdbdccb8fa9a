//! Mints the HS256 bearer token the benchmark sends: the claims runbookd checks (`iss`, `aud`,
//! `sub`, `iat`, `exp`, `roles`), signed by the library's signer with the secret the benchmark
//! gave the server.
#![forbid(unsafe_code)]

/// A token valid for `ttl_seconds` from now.
pub fn mint(
    secret: &[u8],
    issuer: &str,
    audience: &str,
    subject: &str,
    ttl_seconds: i64,
) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), issuer.into());
    claims.insert("aud".into(), audience.into());
    claims.insert("sub".into(), subject.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ttl_seconds).into());
    claims.insert("roles".into(), serde_json::json!(["developer"]));
    runbookd::sign_token(&claims, secret)
}
