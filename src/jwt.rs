//! HS256 JSON Web Tokens (RFC 7519): encodes claims into a signed compact token and decodes a
//! token back after checking its algorithm, HMAC-SHA256 signature, lifetime, issuer and audience.
#![forbid(unsafe_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The only algorithm this module signs with and accepts.
const ALGORITHM: &str = "HS256";

/// The JOSE header of every token this module encodes.
const HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused. The Display text is short and never contains the token, so it can
/// be returned to the client.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url parts, or a header or payload that is not a JSON object.
    #[error("malformed token")]
    Malformed,
    /// The header's `alg` is anything but exactly `HS256`.
    #[error("unsupported token algorithm (only HS256 is accepted)")]
    UnsupportedAlgorithm,
    /// The signature does not match the header and payload under the secret.
    #[error("invalid token signature")]
    BadSignature,
    /// `exp` (plus leeway) is in the past.
    #[error("token has expired")]
    Expired,
    /// `nbf` (minus leeway) is in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is not the expected issuer.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` is neither the expected audience nor an array containing it.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// A required claim is absent.
    #[error("token is missing the {0} claim")]
    MissingClaim(&'static str),
}

/// What a decoded token is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Validation<'a> {
    /// Required value of the `iss` claim.
    pub issuer: &'a str,
    /// Required value of the `aud` claim (or an element of it when it is an array).
    pub audience: &'a str,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_seconds: i64,
    /// The current time, in unix seconds.
    pub now: i64,
}

/// Encodes `claims` as an HS256 JWT signed with `secret`: header `{"alg":"HS256","typ":"JWT"}`,
/// each part base64url without padding.
pub fn encode(claims: &Map<String, Value>, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(HEADER_JSON);
    let payload = URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = mac_for(secret)
        .chain_update(signing_input.as_bytes())
        .finalize()
        .into_bytes();
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Decodes an HS256 JWT and returns its claims once the algorithm, the signature (compared in
/// constant time), `exp` (required), `nbf` (optional), `iss` and `aud` have been checked.
pub fn decode(
    token: &str,
    secret: &[u8],
    validation: &Validation,
) -> Result<Map<String, Value>, JwtError> {
    let mut parts = token.split('.');
    let (Some(header_part), Some(payload_part), Some(signature_part), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };

    let header = json_object(&base64url_decode(header_part)?)?;
    check_header(&header)?;

    let signature = base64url_decode(signature_part)?;
    mac_for(secret)
        .chain_update(header_part.as_bytes())
        .chain_update(b".")
        .chain_update(payload_part.as_bytes())
        .verify_slice(&signature)
        .map_err(|_| JwtError::BadSignature)?;

    let claims = json_object(&base64url_decode(payload_part)?)?;
    check_lifetime(&claims, validation)?;
    check_issuer(&claims, validation.issuer)?;
    check_audience(&claims, validation.audience)?;
    Ok(claims)
}

/// An HMAC-SHA256 instance keyed with `secret`. The key is brought to the hash's block size the
/// way RFC 2104 does (hashed when longer, zero-padded), which makes keying infallible.
fn mac_for(secret: &[u8]) -> HmacSha256 {
    let mut key = Key::<HmacSha256>::default();
    if secret.len() > key.len() {
        let digest = Sha256::digest(secret);
        key[..digest.len()].copy_from_slice(&digest);
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    <HmacSha256 as KeyInit>::new(&key)
}

fn base64url_decode(part: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)
}

fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, JwtError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(JwtError::Malformed),
    }
}

fn check_header(header: &Map<String, Value>) -> Result<(), JwtError> {
    if header.get("alg").and_then(Value::as_str) != Some(ALGORITHM) {
        return Err(JwtError::UnsupportedAlgorithm);
    }
    // RFC 7515 4.1.11: extensions listed in `crit` must be understood; this module knows none.
    if header.contains_key("crit") {
        return Err(JwtError::Malformed);
    }
    Ok(())
}

fn check_lifetime(claims: &Map<String, Value>, validation: &Validation) -> Result<(), JwtError> {
    let now = i128::from(validation.now);
    let leeway = i128::from(validation.leeway_seconds);

    // `now` is whole seconds, so rounding a fractional `exp` down and a fractional `nbf` up
    // keeps both comparisons exact.
    let expires_at =
        numeric_date(claims, "exp", f64::floor)?.ok_or(JwtError::MissingClaim("exp"))?;
    if now - leeway > expires_at {
        return Err(JwtError::Expired);
    }
    if let Some(not_before) = numeric_date(claims, "nbf", f64::ceil)? {
        if now + leeway < not_before {
            return Err(JwtError::NotYetValid);
        }
    }
    Ok(())
}

/// A NumericDate claim in whole seconds, fractional values rounded with `round`: absent is
/// `None`, anything but a JSON number is malformed.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &str,
    round: fn(f64) -> f64,
) -> Result<Option<i128>, JwtError> {
    let number = match claims.get(name) {
        None => return Ok(None),
        Some(Value::Number(number)) => number,
        Some(_) => return Err(JwtError::Malformed),
    };
    let seconds = if let Some(whole) = number.as_i64() {
        i128::from(whole)
    } else if let Some(whole) = number.as_u64() {
        i128::from(whole)
    } else {
        // JSON numbers are finite; the cast saturates at the i128 range.
        round(number.as_f64().unwrap_or(0.0)) as i128
    };
    Ok(Some(seconds))
}

fn check_issuer(claims: &Map<String, Value>, issuer: &str) -> Result<(), JwtError> {
    match claims.get("iss") {
        None => Err(JwtError::MissingClaim("iss")),
        Some(Value::String(actual)) if actual == issuer => Ok(()),
        Some(_) => Err(JwtError::WrongIssuer),
    }
}

fn check_audience(claims: &Map<String, Value>, audience: &str) -> Result<(), JwtError> {
    let accepted = match claims.get("aud") {
        None => return Err(JwtError::MissingClaim("aud")),
        Some(Value::String(actual)) => actual == audience,
        Some(Value::Array(actual)) => actual.iter().any(|entry| entry.as_str() == Some(audience)),
        Some(_) => false,
    };
    if accepted {
        Ok(())
    } else {
        Err(JwtError::WrongAudience)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"unit-test-secret-0123456789abcdef0123";
    /// The clock of token tests.
    pub(crate) const NOW: i64 = 1_700_000_000;

    /// The checks of the dev issuer and audience at [`NOW`].
    pub(crate) fn validation() -> Validation<'static> {
        Validation {
            issuer: "dev-idp",
            audience: "dev-api",
            leeway_seconds: 30,
            now: NOW,
        }
    }

    /// Test claims from a JSON object literal.
    pub(crate) fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("test claims must be an object, got {other}"),
        }
    }

    fn valid_claims() -> Map<String, Value> {
        claims(json!({
            "iss": "dev-idp",
            "aud": "dev-api",
            "sub": "alice",
            "iat": NOW,
            "exp": NOW + 3600,
            "roles": ["admin"],
        }))
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Builds a token from raw header and payload JSON, signed with HMAC-SHA256 keyed through
    /// the library's own key handling (independent of `mac_for`).
    fn signed_token(header_json: &str, payload_json: &str, secret: &[u8]) -> String {
        let input = format!(
            "{}.{}",
            b64(header_json.as_bytes()),
            b64(payload_json.as_bytes())
        );
        let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).unwrap();
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(&mac.finalize().into_bytes()))
    }

    fn payload_json(value: Value) -> String {
        value.to_string()
    }

    fn decode_claims(value: Value) -> Result<Map<String, Value>, JwtError> {
        decode(&encode(&claims(value), SECRET), SECRET, &validation())
    }

    fn replace_part(token: &str, index: usize, replacement: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[index] = replacement;
        parts.join(".")
    }

    // Expected tokens computed independently with Python's hmac, hashlib and base64 modules
    // (json.dumps with sort_keys, compact separators and ensure_ascii=False).
    const KNOWN_ANSWER_SHORT_SECRET: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJkZXYtYXBpIiwiZXhwIjoxNzAwMDAzNjAwLCJpYXQiOjE3MDAwMDAwMDAsImlzcyI6ImRldi1pZHAiLCJyb2xlcyI6WyJhZG1pbiIsIm9wcyJdLCJzdWIiOiJ6b8OrIn0.Pi6drh9zBgpRwY3IXq3ouCQCM_7Cf5a4bv6cksN87AU";
    const KNOWN_ANSWER_LONG_SECRET: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJkZXYtYXBpIiwiZXhwIjoxNzAwMDAzNjAwLCJpYXQiOjE3MDAwMDAwMDAsImlzcyI6ImRldi1pZHAiLCJyb2xlcyI6WyJhZG1pbiIsIm9wcyJdLCJzdWIiOiJ6b8OrIn0.LxIxzW8jTy6QGQw6aXBxfORDDlPrPW40oyksKGUPYQE";

    fn known_answer_claims() -> Map<String, Value> {
        claims(json!({
            "aud": "dev-api",
            "exp": 1_700_003_600,
            "iat": 1_700_000_000,
            "iss": "dev-idp",
            "roles": ["admin", "ops"],
            "sub": "zo\u{eb}",
        }))
    }

    #[test]
    fn encode_matches_independent_computation_with_short_secret() {
        let secret = b"known-answer-secret-0123456789abcdef";
        assert_eq!(secret.len(), 36);
        assert_eq!(
            encode(&known_answer_claims(), secret),
            KNOWN_ANSWER_SHORT_SECRET
        );
    }

    #[test]
    fn encode_matches_independent_computation_with_secret_longer_than_block() {
        let secret = [b'L'; 100];
        assert_eq!(
            encode(&known_answer_claims(), &secret),
            KNOWN_ANSWER_LONG_SECRET
        );
    }

    #[test]
    fn decode_accepts_independently_computed_token() {
        let decoded = decode(
            KNOWN_ANSWER_SHORT_SECRET,
            b"known-answer-secret-0123456789abcdef",
            &validation(),
        )
        .unwrap();
        assert_eq!(decoded, known_answer_claims());
    }

    #[test]
    fn keys_around_block_size_match_library_keying() {
        let payload = payload_json(Value::Object(valid_claims()));
        for length in [0usize, 1, 31, 32, 63, 64, 65, 128, 1000] {
            let secret: Vec<u8> = (0..length).map(|i| (i * 7 + 3) as u8).collect();
            let expected = signed_token(HEADER_JSON, &payload, &secret);
            assert_eq!(
                encode(&valid_claims(), &secret),
                expected,
                "key length {length}"
            );
            assert!(decode(&expected, &secret, &validation()).is_ok());
        }
    }

    #[test]
    fn header_is_hs256_jwt() {
        let token = encode(&valid_claims(), SECRET);
        let header_part = token.split('.').next().unwrap();
        let header = URL_SAFE_NO_PAD.decode(header_part).unwrap();
        assert_eq!(header, HEADER_JSON.as_bytes());
        assert!(!token.contains('='));
        assert_eq!(token.split('.').count(), 3);
    }

    #[test]
    fn round_trip_returns_the_claims() {
        let original = valid_claims();
        let token = encode(&original, SECRET);
        assert_eq!(decode(&token, SECRET, &validation()).unwrap(), original);
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let token = encode(&valid_claims(), SECRET);
        let mut escalated = valid_claims();
        escalated.insert("roles".into(), json!(["admin", "root"]));
        let forged_payload = b64(payload_json(Value::Object(escalated)).as_bytes());
        let forged = replace_part(&token, 1, &forged_payload);
        assert_eq!(
            decode(&forged, SECRET, &validation()),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn tampered_signature_is_rejected() {
        let token = encode(&valid_claims(), SECRET);
        let signature = token.split('.').nth(2).unwrap();
        let first = if signature.starts_with('A') { "B" } else { "A" };
        let altered = format!("{first}{}", &signature[1..]);
        assert_eq!(
            decode(&replace_part(&token, 2, &altered), SECRET, &validation()),
            Err(JwtError::BadSignature)
        );
        // 40 characters decode to a valid 30-byte string: a short MAC, not a base64 error.
        let truncated = &signature[..40];
        assert_eq!(
            decode(&replace_part(&token, 2, truncated), SECRET, &validation()),
            Err(JwtError::BadSignature)
        );
        assert_eq!(
            decode(&replace_part(&token, 2, ""), SECRET, &validation()),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let token = encode(&valid_claims(), SECRET);
        assert_eq!(
            decode(
                &token,
                b"another-secret-0123456789abcdef0123",
                &validation()
            ),
            Err(JwtError::BadSignature)
        );
        assert_eq!(
            decode(&token, b"", &validation()),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn alg_none_with_empty_signature_is_rejected() {
        let payload = b64(payload_json(Value::Object(valid_claims())).as_bytes());
        for header in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"None"}"#,
            r#"{"alg":"NONE"}"#,
        ] {
            let token = format!("{}.{payload}.", b64(header.as_bytes()));
            assert_eq!(
                decode(&token, SECRET, &validation()),
                Err(JwtError::UnsupportedAlgorithm),
                "{header}"
            );
        }
    }

    #[test]
    fn alg_none_is_rejected_even_with_a_valid_hs256_signature() {
        let payload = payload_json(Value::Object(valid_claims()));
        let token = signed_token(r#"{"alg":"none"}"#, &payload, SECRET);
        assert_eq!(
            decode(&token, SECRET, &validation()),
            Err(JwtError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn alg_hs512_is_rejected() {
        use sha2::Sha512;
        let header = b64(br#"{"alg":"HS512","typ":"JWT"}"#);
        let payload = b64(payload_json(Value::Object(valid_claims())).as_bytes());
        let input = format!("{header}.{payload}");
        let mut mac = <Hmac<Sha512> as Mac>::new_from_slice(SECRET).unwrap();
        mac.update(input.as_bytes());
        let token = format!("{input}.{}", b64(&mac.finalize().into_bytes()));
        assert_eq!(
            decode(&token, SECRET, &validation()),
            Err(JwtError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn other_or_missing_algorithms_are_rejected_even_when_signed_with_hs256() {
        let payload = payload_json(Value::Object(valid_claims()));
        for header in [
            r#"{"alg":"HS384"}"#,
            r#"{"alg":"RS256"}"#,
            r#"{"alg":"ES256"}"#,
            r#"{"alg":"hs256"}"#,
            r#"{"alg":"HS256 "}"#,
            r#"{"alg":""}"#,
            r#"{"alg":null}"#,
            r#"{"alg":256}"#,
            r#"{"alg":["HS256"]}"#,
            r#"{"typ":"JWT"}"#,
            r#"{}"#,
        ] {
            let token = signed_token(header, &payload, SECRET);
            assert_eq!(
                decode(&token, SECRET, &validation()),
                Err(JwtError::UnsupportedAlgorithm),
                "{header}"
            );
        }
    }

    #[test]
    fn header_without_typ_is_accepted() {
        let payload = payload_json(Value::Object(valid_claims()));
        let token = signed_token(r#"{"alg":"HS256"}"#, &payload, SECRET);
        assert!(decode(&token, SECRET, &validation()).is_ok());
    }

    #[test]
    fn critical_header_extensions_are_rejected() {
        let payload = payload_json(Value::Object(valid_claims()));
        let token = signed_token(
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            &payload,
            SECRET,
        );
        assert_eq!(
            decode(&token, SECRET, &validation()),
            Err(JwtError::Malformed)
        );
    }

    #[test]
    fn expiry_is_checked_with_leeway() {
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW - 31})),
            Err(JwtError::Expired)
        );
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW - 3600})),
            Err(JwtError::Expired)
        );
        assert!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW - 30})).is_ok()
        );
        assert!(decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW - 1})).is_ok());
        assert!(decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW})).is_ok());
    }

    #[test]
    fn expiry_without_leeway_is_exact() {
        let strict = Validation {
            leeway_seconds: 0,
            ..validation()
        };
        let at = |exp: i64| {
            let mut c = valid_claims();
            c.insert("exp".into(), json!(exp));
            decode(&encode(&c, SECRET), SECRET, &strict)
        };
        assert!(at(NOW).is_ok());
        assert_eq!(at(NOW - 1), Err(JwtError::Expired));
    }

    #[test]
    fn fractional_dates_are_accepted_and_compared() {
        assert!(decode_claims(
            json!({"iss": "dev-idp", "aud": "dev-api", "exp": (NOW - 30) as f64 + 0.5})
        )
        .is_ok());
        assert_eq!(
            decode_claims(
                json!({"iss": "dev-idp", "aud": "dev-api", "exp": (NOW - 31) as f64 + 0.5})
            ),
            Err(JwtError::Expired)
        );
        assert_eq!(
            decode_claims(json!({
                "iss": "dev-idp", "aud": "dev-api", "exp": NOW + 60,
                "nbf": (NOW + 30) as f64 + 0.25
            })),
            Err(JwtError::NotYetValid)
        );
    }

    #[test]
    fn huge_dates_do_not_overflow() {
        assert!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": u64::MAX})).is_ok()
        );
        assert!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": i64::MAX})).is_ok()
        );
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": i64::MIN})),
            Err(JwtError::Expired)
        );
        let extreme = Validation {
            now: i64::MAX,
            leeway_seconds: i64::MAX,
            ..validation()
        };
        let token = encode(&valid_claims(), SECRET);
        assert!(decode(&token, SECRET, &extreme).is_ok());
    }

    #[test]
    fn missing_or_non_numeric_expiry_is_rejected() {
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api"})),
            Err(JwtError::MissingClaim("exp"))
        );
        for exp in [
            json!("1800000000"),
            json!(null),
            json!(true),
            json!([NOW + 60]),
        ] {
            assert_eq!(
                decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": exp})),
                Err(JwtError::Malformed)
            );
        }
    }

    #[test]
    fn not_before_is_checked_with_leeway() {
        assert_eq!(
            decode_claims(
                json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW + 3600, "nbf": NOW + 31})
            ),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(
            decode_claims(
                json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW + 3600, "nbf": NOW + 600})
            ),
            Err(JwtError::NotYetValid)
        );
        assert!(decode_claims(
            json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW + 3600, "nbf": NOW + 30})
        )
        .is_ok());
        assert!(decode_claims(
            json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW + 3600, "nbf": NOW - 10})
        )
        .is_ok());
        assert_eq!(
            decode_claims(
                json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW + 3600, "nbf": "soon"})
            ),
            Err(JwtError::Malformed)
        );
    }

    #[test]
    fn issuer_must_match() {
        assert_eq!(
            decode_claims(json!({"iss": "evil-idp", "aud": "dev-api", "exp": NOW + 60})),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            decode_claims(json!({"iss": "DEV-IDP", "aud": "dev-api", "exp": NOW + 60})),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            decode_claims(json!({"iss": ["dev-idp"], "aud": "dev-api", "exp": NOW + 60})),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            decode_claims(json!({"aud": "dev-api", "exp": NOW + 60})),
            Err(JwtError::MissingClaim("iss"))
        );
    }

    #[test]
    fn audience_as_string() {
        assert!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW + 60})).is_ok()
        );
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": "other-api", "exp": NOW + 60})),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": "dev-api,other", "exp": NOW + 60})),
            Err(JwtError::WrongAudience)
        );
    }

    #[test]
    fn audience_as_array() {
        assert!(decode_claims(
            json!({"iss": "dev-idp", "aud": ["other-api", "dev-api"], "exp": NOW + 60})
        )
        .is_ok());
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": ["a", "b"], "exp": NOW + 60})),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": [], "exp": NOW + 60})),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "aud": [["dev-api"]], "exp": NOW + 60})),
            Err(JwtError::WrongAudience)
        );
    }

    #[test]
    fn audience_missing_or_of_wrong_type_is_rejected() {
        assert_eq!(
            decode_claims(json!({"iss": "dev-idp", "exp": NOW + 60})),
            Err(JwtError::MissingClaim("aud"))
        );
        for aud in [json!(null), json!(7), json!({"aud": "dev-api"})] {
            assert_eq!(
                decode_claims(json!({"iss": "dev-idp", "aud": aud, "exp": NOW + 60})),
                Err(JwtError::WrongAudience)
            );
        }
    }

    #[test]
    fn structurally_broken_tokens_are_malformed() {
        let token = encode(&valid_claims(), SECRET);
        let parts: Vec<&str> = token.split('.').collect();
        let cases = [
            String::new(),
            ".".to_string(),
            "..".to_string(),
            "not a token".to_string(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{token}.{}", parts[2]),
            format!("{token}."),
            format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
            format!("{}.{}.+{}", parts[0], parts[1], &parts[2][1..]),
            format!("!{}.{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}", b64(b"not json"), parts[1], parts[2]),
            format!("{}.{}.{}", b64(b"[\"HS256\"]"), parts[1], parts[2]),
            format!(" {token}"),
        ];
        for case in &cases {
            assert_eq!(
                decode(case, SECRET, &validation()),
                Err(JwtError::Malformed),
                "{case}"
            );
        }
    }

    #[test]
    fn payload_that_is_not_an_object_is_malformed() {
        for payload in ["[1,2]", "\"claims\"", "42", "null", "{\"exp\":"] {
            let token = signed_token(HEADER_JSON, payload, SECRET);
            assert_eq!(
                decode(&token, SECRET, &validation()),
                Err(JwtError::Malformed),
                "{payload}"
            );
        }
    }

    #[test]
    fn signature_is_checked_before_the_payload_is_parsed() {
        let token = encode(&valid_claims(), SECRET);
        let garbage = replace_part(&token, 1, &b64(b"{not json"));
        assert_eq!(
            decode(&garbage, SECRET, &validation()),
            Err(JwtError::BadSignature)
        );
        let expired = claims(json!({"iss": "x", "aud": "y", "exp": 1}));
        let other_secret = encode(&expired, b"someone-else");
        assert_eq!(
            decode(&other_secret, SECRET, &validation()),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn error_messages_are_short_and_distinct() {
        let errors = [
            JwtError::Malformed,
            JwtError::UnsupportedAlgorithm,
            JwtError::BadSignature,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::WrongIssuer,
            JwtError::WrongAudience,
            JwtError::MissingClaim("exp"),
        ];
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for message in &messages {
            assert!(!message.is_empty() && message.len() <= 80, "{message}");
        }
        let mut unique = messages.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), messages.len());
        assert!(JwtError::MissingClaim("aud").to_string().contains("aud"));
    }
}
