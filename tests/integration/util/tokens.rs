//! JWT minting and checking for the tests, written independently of the server's code (HS256,
//! HS512 and `alg: none` tokens, any header), so that it is an oracle of the token format.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

/// The HS256 secret every test server is started with (longer than the 32 byte minimum).
pub const TEST_SECRET: &str = "integration-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz";
/// Issuer and audience the server expects by default.
pub const ISSUER: &str = "dev-idp";
pub const AUDIENCE: &str = "dev-api";

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Standard claims: iss, aud, sub, iat, exp (one hour), roles.
pub fn claims(sub: &str, roles: Value) -> Value {
    let now = now_secs();
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + 3600,
        "roles": roles,
    })
}

/// An HS256-signed JWT of `claims` (the header says HS256).
pub fn sign_hs256(claims: &Value, secret: &[u8]) -> String {
    sign_with_header(&json!({"alg": "HS256", "typ": "JWT"}), claims, secret)
}

/// A JWT with any header, signed with HMAC-SHA256 over `header.payload`.
pub fn sign_with_header(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(header).unwrap()),
        b64url(&serde_json::to_vec(claims).unwrap())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(signing_input.as_bytes());
    let sig = mac.finalize().into_bytes();
    format!("{signing_input}.{}", b64url(&sig))
}

/// A JWT whose header says HS512, correctly signed with HMAC-SHA512.
pub fn sign_hs512(claims: &Value, secret: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(&json!({"alg": "HS512", "typ": "JWT"})).unwrap()),
        b64url(&serde_json::to_vec(claims).unwrap())
    );
    let mut mac = Hmac::<sha2::Sha512>::new_from_slice(secret).unwrap();
    mac.update(signing_input.as_bytes());
    let sig = mac.finalize().into_bytes();
    format!("{signing_input}.{}", b64url(&sig))
}

/// An unsigned `alg: none` token.
pub fn alg_none(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(&serde_json::to_vec(&json!({"alg": "none", "typ": "JWT"})).unwrap()),
        b64url(&serde_json::to_vec(claims).unwrap())
    )
}

/// A valid token for the test secret.
pub fn token(sub: &str, roles: &[&str]) -> String {
    sign_hs256(&claims(sub, json!(roles)), TEST_SECRET.as_bytes())
}

/// A valid developer token.
pub fn dev_token() -> String {
    token("dev-tester", &["developer"])
}

/// A valid admin token.
pub fn admin_token() -> String {
    token("admin-tester", &["admin"])
}

/// Decodes a JWT segment (header or payload) as JSON.
pub fn decode_segment(segment: &str) -> Value {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .unwrap_or_else(|e| panic!("bad base64url JWT segment {segment:?}: {e}"));
    serde_json::from_slice(&bytes).unwrap()
}

/// Verifies an HS256 token's signature with `secret`.
pub fn verify_hs256(token: &str, secret: &[u8]) -> bool {
    let mut parts = token.rsplitn(2, '.');
    let (Some(sig), Some(input)) = (parts.next(), parts.next()) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    b64url(&mac.finalize().into_bytes()) == sig
}
