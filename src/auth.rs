//! Who is calling and what they may do: turns the Authorization header into a Principal,
//! checks a runbook's required claims against it (RBAC), and mints tokens for dev-login and for
//! runs. A token with a `run_id` claim is a run token: its Principal carries a [`RunScope`].
#![forbid(unsafe_code)]

use serde_json::{json, Map, Value};

use crate::jwt::{self, JwtError, Validation};

/// The claim naming the run a run token was minted for.
const RUN_ID_CLAIM: &str = "run_id";

/// The claim holding a run token's recursion stack (the run's own runbook last).
const STACK_CLAIM: &str = "rbk_stack";

/// What a run token is limited to: the run it was minted for and the recursion stack that run
/// was started with, its own runbook included. Sub-runbook calls take their stack from here,
/// never from a request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunScope {
    pub run_id: String,
    pub stack: Vec<String>,
}

/// The caller, as established from a verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The `sub` claim (a token without a non-empty string `sub` is refused).
    pub subject: String,
    /// The `roles` claim, read with [`claim_values`].
    pub roles: Vec<String>,
    /// Set for a run token (one with a `run_id` claim): what it is limited to.
    pub run_scope: Option<RunScope>,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
}

/// Why a request could not be authenticated. The Display text is safe to return to clients.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// No Authorization header, another scheme than Bearer, or an empty token.
    #[error("missing bearer token")]
    MissingToken,
    /// A bearer token was given but refused.
    #[error("invalid token: {0}")]
    InvalidToken(#[source] JwtError),
    /// A signed token with a `run_id` claim that is not a string, or without a recursion stack
    /// (`rbk_stack`, a list of strings).
    #[error("invalid token: a run token needs a string run_id and a rbk_stack list of strings")]
    BadRunScope,
    /// A valid token whose `sub` is absent, empty or not a string: it names nobody.
    #[error("invalid token: the sub claim must be a non-empty string")]
    NoSubject,
}

impl AuthError {
    /// The text for the client; `per_process_secret`: dev login is on with a secret generated
    /// at start, so a token signed before a restart no longer verifies, and the text says so.
    pub fn explained(&self, per_process_secret: bool) -> String {
        match self {
            AuthError::InvalidToken(JwtError::BadSignature) if per_process_secret => format!(
                "{self} (dev-login tokens are only valid until the server restarts; sign in again)"
            ),
            _ => self.to_string(),
        }
    }
}

/// Authenticates a request from the value of its Authorization header (`None` if absent):
/// `Bearer <jwt>`, scheme case-insensitive, surrounding whitespace ignored.
pub fn authenticate(
    authorization: Option<&str>,
    secret: &[u8],
    validation: &Validation,
) -> Result<Principal, AuthError> {
    let token = authorization
        .and_then(bearer_token)
        .ok_or(AuthError::MissingToken)?;
    let claims = jwt::decode(token, secret, validation).map_err(AuthError::InvalidToken)?;
    principal_from_claims(claims)
}

/// The token of a `Bearer` Authorization value, or `None` for another scheme or an empty token.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

fn principal_from_claims(claims: Map<String, Value>) -> Result<Principal, AuthError> {
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(AuthError::NoSubject)?
        .to_string();
    let roles = claim_values(&claims, "roles");
    let run_scope = run_scope_of(&claims)?;
    Ok(Principal {
        subject,
        roles,
        run_scope,
        claims,
    })
}

/// The scope of a run token; `None` when there is no `run_id` claim. Any `run_id` claim makes
/// the token a run token, so one that cannot be read refuses the token rather than widening it.
fn run_scope_of(claims: &Map<String, Value>) -> Result<Option<RunScope>, AuthError> {
    let Some(run_id) = claims.get(RUN_ID_CLAIM) else {
        return Ok(None);
    };
    let run_id = run_id
        .as_str()
        .filter(|id| !id.is_empty())
        .ok_or(AuthError::BadRunScope)?;
    let stack = match claims.get(STACK_CLAIM) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<Vec<String>>>()
            .ok_or(AuthError::BadRunScope)?,
        _ => return Err(AuthError::BadRunScope),
    };
    Ok(Some(RunScope {
        run_id: run_id.to_string(),
        stack,
    }))
}

/// The values of a claim as strings: a JSON string is split on commas (each value trimmed,
/// empty ones dropped); an array gives its string elements as they are and its numbers and
/// booleans converted to strings, skipping other elements; anything else (or an absent claim)
/// gives no values.
pub fn claim_values(claims: &Map<String, Value>, name: &str) -> Vec<String> {
    match claims.get(name) {
        Some(Value::String(text)) => text
            .split(',')
            .map(str::trim)
            .filter(|value| !value.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Value::Array(elements)) => elements
            .iter()
            .filter_map(|element| match element {
                Value::String(text) => Some(text.clone()),
                Value::Number(number) => Some(number.to_string()),
                Value::Bool(flag) => Some(flag.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// RBAC: for each `(claim, allowed values)` pair the principal must hold at least one of the
/// allowed values in that claim (`roles` as in [`Principal::roles`], other claims read with
/// [`claim_values`]); values match exactly, after trimming the allowed ones. A pair whose allowed
/// list is empty can never be satisfied. On refusal the reason is a client-safe sentence naming
/// every unsatisfied claim and its allowed values (never the token's own values), e.g.
/// `RBAC: missing required claim roles (one of: admin, ops)`.
pub fn check_required_claims(
    principal: &Principal,
    required: &[(String, Vec<String>)],
) -> Result<(), String> {
    let failures: Vec<String> = required
        .iter()
        .filter_map(|(claim, allowed)| {
            let allowed: Vec<&str> = allowed
                .iter()
                .map(|value| value.trim())
                .filter(|value| !value.is_empty())
                .collect();
            if allowed.is_empty() {
                return Some(format!("required claim {claim} lists no allowed values"));
            }
            if holds_any(principal, claim, &allowed) {
                None
            } else {
                Some(format!(
                    "missing required claim {claim} (one of: {})",
                    allowed.join(", ")
                ))
            }
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("RBAC: {}", failures.join("; ")))
    }
}

fn holds_any(principal: &Principal, claim: &str, allowed: &[&str]) -> bool {
    let from_claims;
    let held: &[String] = if claim == "roles" {
        &principal.roles
    } else {
        from_claims = claim_values(&principal.claims, claim);
        &from_claims
    };
    held.iter().any(|value| allowed.contains(&value.as_str()))
}

/// What to put in a minted token.
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub subject: &'a str,
    pub roles: &'a [String],
    /// `iat`, unix seconds.
    pub issued_at: i64,
    /// `exp`, unix seconds.
    pub expires_at: i64,
    /// Makes a run token (handed to a run's script): the run and its recursion stack, its own
    /// runbook last, become the `run_id` and `rbk_stack` claims.
    pub run: Option<&'a RunScope>,
}

/// Mints an HS256 token with `iss`, `aud`, `sub`, `iat`, `exp`, `roles` (an array) and, for a
/// run token, `run_id` and `rbk_stack`.
pub fn mint(secret: &[u8], request: &TokenRequest) -> String {
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(request.issuer));
    claims.insert("aud".into(), json!(request.audience));
    claims.insert("sub".into(), json!(request.subject));
    claims.insert("iat".into(), json!(request.issued_at));
    claims.insert("exp".into(), json!(request.expires_at));
    claims.insert("roles".into(), json!(request.roles));
    if let Some(run) = request.run {
        claims.insert(RUN_ID_CLAIM.into(), json!(run.run_id));
        claims.insert(STACK_CLAIM.into(), json!(run.stack));
    }
    jwt::encode(&claims, secret)
}

/// A new secret for signing tokens: 32 bytes from the OS random number generator as 64
/// lowercase hex characters.
pub fn random_secret() -> Result<String, std::io::Error> {
    const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|error| match error.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::other(format!("OS random number generator failed: {error}")),
    })?;
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(HEX_DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(HEX_DIGITS[usize::from(byte & 0x0f)]));
    }
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::jwt::tests::{claims as object, validation, NOW};

    const SECRET: &[u8] = b"auth-test-secret-0123456789abcdef0123";

    fn token_with(extra: Value) -> String {
        let mut claims = object(json!({
            "iss": "dev-idp",
            "aud": "dev-api",
            "iat": NOW,
            "exp": NOW + 600,
            "sub": "tester",
        }));
        claims.extend(object(extra));
        jwt::encode(&claims, SECRET)
    }

    fn principal_with(extra: Value) -> Principal {
        let header = format!("Bearer {}", token_with(extra));
        authenticate(Some(&header), SECRET, &validation()).unwrap()
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| value.to_string()).collect()
    }

    fn requirement(claim: &str, allowed: &[&str]) -> (String, Vec<String>) {
        (claim.to_string(), strings(allowed))
    }

    #[test]
    fn a_bad_signature_under_a_per_process_secret_gets_a_hint() {
        let bad = AuthError::InvalidToken(JwtError::BadSignature);
        assert_eq!(
            bad.explained(false),
            "invalid token: invalid token signature"
        );
        assert_eq!(
            bad.explained(true),
            "invalid token: invalid token signature (dev-login tokens are only valid until the server restarts; sign in again)"
        );
        let expired = AuthError::InvalidToken(JwtError::Expired);
        assert_eq!(expired.explained(true), expired.to_string());
    }

    #[test]
    fn missing_header_is_missing_token() {
        assert_eq!(
            authenticate(None, SECRET, &validation()),
            Err(AuthError::MissingToken)
        );
    }

    #[test]
    fn empty_or_non_bearer_headers_are_missing_token() {
        let token = token_with(json!({"sub": "alice"}));
        for header in [
            String::new(),
            "   ".to_string(),
            "Bearer".to_string(),
            "Bearer    ".to_string(),
            format!("Bearer{token}"),
            format!("Basic {token}"),
            format!("Token {token}"),
            format!("Bearerx {token}"),
            token.clone(),
        ] {
            assert_eq!(
                authenticate(Some(&header), SECRET, &validation()),
                Err(AuthError::MissingToken),
                "{header:?}"
            );
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_tolerates_extra_spaces() {
        let token = token_with(json!({"sub": "alice"}));
        for header in [
            format!("Bearer {token}"),
            format!("bearer {token}"),
            format!("BEARER {token}"),
            format!("BeArEr {token}"),
            format!("Bearer     {token}"),
            format!("  Bearer {token}  "),
            format!("Bearer\t{token}"),
        ] {
            let principal = authenticate(Some(&header), SECRET, &validation())
                .unwrap_or_else(|error| panic!("{header:?}: {error}"));
            assert_eq!(principal.subject, "alice");
        }
    }

    #[test]
    fn token_with_trailing_words_is_invalid() {
        let header = format!("Bearer {} extra", token_with(json!({})));
        assert_eq!(
            authenticate(Some(&header), SECRET, &validation()),
            Err(AuthError::InvalidToken(JwtError::Malformed))
        );
    }

    #[test]
    fn refused_tokens_carry_the_reason() {
        let expired = jwt::encode(
            &object(json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW - 3600})),
            SECRET,
        );
        let error =
            authenticate(Some(&format!("Bearer {expired}")), SECRET, &validation()).unwrap_err();
        assert_eq!(error, AuthError::InvalidToken(JwtError::Expired));
        assert_eq!(error.to_string(), "invalid token: token has expired");
        assert!(std::error::Error::source(&error).is_some());
        assert!(!error.to_string().contains(&expired));

        let forged = token_with(json!({"sub": "alice"}));
        assert_eq!(
            authenticate(
                Some(&format!("Bearer {forged}")),
                b"a-different-secret-0123456789abcdef",
                &validation()
            ),
            Err(AuthError::InvalidToken(JwtError::BadSignature))
        );
    }

    #[test]
    fn principal_carries_subject_roles_and_claims() {
        let principal =
            principal_with(json!({"sub": "alice", "roles": ["admin", "ops"], "team": "sre"}));
        assert_eq!(principal.subject, "alice");
        assert_eq!(principal.roles, strings(&["admin", "ops"]));
        assert_eq!(principal.run_scope, None);
        assert_eq!(principal.claims.get("team"), Some(&json!("sre")));
        assert_eq!(principal.claims.get("iss"), Some(&json!("dev-idp")));
    }

    #[test]
    fn a_token_without_a_string_subject_is_refused() {
        assert_eq!(principal_with(json!({})).subject, "tester");
        for sub in [json!(42), json!(null), json!(""), json!(["alice"])] {
            let header = format!("Bearer {}", token_with(json!({"sub": sub})));
            let err = authenticate(Some(&header), SECRET, &validation()).unwrap_err();
            assert_eq!(err, AuthError::NoSubject, "sub {sub}");
        }
        let mut claims = object(json!({"iss": "dev-idp", "aud": "dev-api", "exp": NOW + 600}));
        claims.remove("sub");
        let header = format!("Bearer {}", jwt::encode(&claims, SECRET));
        let err = authenticate(Some(&header), SECRET, &validation()).unwrap_err();
        assert_eq!(err, AuthError::NoSubject);
    }

    #[test]
    fn roles_as_comma_separated_string() {
        let principal = principal_with(json!({"roles": " admin, ops,,  ,developer "}));
        assert_eq!(principal.roles, strings(&["admin", "ops", "developer"]));
        assert!(principal_with(json!({"roles": ""})).roles.is_empty());
        assert!(principal_with(json!({"roles": " , "})).roles.is_empty());
    }

    #[test]
    fn roles_as_list() {
        let principal =
            principal_with(json!({"roles": ["admin", 7, true, null, {"x": 1}, ["ops"]]}));
        assert_eq!(principal.roles, strings(&["admin", "7", "true"]));
    }

    #[test]
    fn roles_of_other_types_give_nothing() {
        assert!(principal_with(json!({})).roles.is_empty());
        assert!(principal_with(json!({"roles": 5})).roles.is_empty());
        assert!(principal_with(json!({"roles": true})).roles.is_empty());
        assert!(principal_with(json!({"roles": {"admin": true}}))
            .roles
            .is_empty());
    }

    #[test]
    fn claim_values_reads_any_claim() {
        let claims = object(json!({
            "groups": "a,b",
            "levels": [1, 2.5, false],
            "single": "x",
            "count": 3,
        }));
        assert_eq!(claim_values(&claims, "groups"), strings(&["a", "b"]));
        assert_eq!(
            claim_values(&claims, "levels"),
            strings(&["1", "2.5", "false"])
        );
        assert_eq!(claim_values(&claims, "single"), strings(&["x"]));
        assert!(claim_values(&claims, "count").is_empty());
        assert!(claim_values(&claims, "absent").is_empty());
    }

    #[test]
    fn rbac_passes_when_every_claim_holds_one_allowed_value() {
        let principal = principal_with(json!({"roles": "developer, ops", "team": ["sre", "db"]}));
        let required = [
            requirement("roles", &["admin", "ops"]),
            requirement("team", &["db"]),
        ];
        assert_eq!(check_required_claims(&principal, &required), Ok(()));
        assert_eq!(check_required_claims(&principal, &[]), Ok(()));
    }

    #[test]
    fn rbac_fails_when_one_of_several_claims_is_unmet() {
        let principal = principal_with(json!({"roles": ["ops"], "team": "web"}));
        let required = [
            requirement("roles", &["admin", "ops"]),
            requirement("team", &["sre", "db"]),
        ];
        let reason = check_required_claims(&principal, &required).unwrap_err();
        assert_eq!(
            reason,
            "RBAC: missing required claim team (one of: sre, db)"
        );
        assert!(!reason.contains("web"));
    }

    #[test]
    fn rbac_reports_every_unmet_claim() {
        let principal = principal_with(json!({"sub": "bob"}));
        let required = [
            requirement("roles", &["admin", "ops"]),
            requirement("team", &["sre"]),
        ];
        assert_eq!(
            check_required_claims(&principal, &required),
            Err("RBAC: missing required claim roles (one of: admin, ops); \
                 missing required claim team (one of: sre)"
                .to_string())
        );
    }

    #[test]
    fn rbac_matches_exactly_after_trimming_allowed_values() {
        let principal = principal_with(json!({"roles": ["Admin"]}));
        assert!(check_required_claims(&principal, &[requirement("roles", &["admin"])]).is_err());
        assert!(check_required_claims(&principal, &[requirement("roles", &["adm"])]).is_err());
        assert_eq!(
            check_required_claims(&principal, &[requirement("roles", &[" Admin "])]),
            Ok(())
        );
    }

    #[test]
    fn rbac_with_no_allowed_values_never_passes() {
        let principal = principal_with(json!({"roles": ["admin"]}));
        for allowed in [&[][..], &[""][..], &["  "][..]] {
            let reason =
                check_required_claims(&principal, &[requirement("roles", allowed)]).unwrap_err();
            assert!(reason.starts_with("RBAC: "), "{reason}");
            assert!(reason.contains("roles"), "{reason}");
        }
    }

    #[test]
    fn rbac_reads_roles_from_the_principal() {
        let principal = Principal {
            subject: "s".into(),
            roles: strings(&["admin"]),
            run_scope: None,
            claims: Map::new(),
        };
        assert_eq!(
            check_required_claims(&principal, &[requirement("roles", &["admin"])]),
            Ok(())
        );
    }

    #[test]
    fn minted_token_round_trips_through_authenticate() {
        let roles = strings(&["developer", "ops"]);
        let token = mint(
            SECRET,
            &TokenRequest {
                issuer: "dev-idp",
                audience: "dev-api",
                subject: "dev-user-1",
                roles: &roles,
                issued_at: NOW,
                expires_at: NOW + 480 * 60,
                run: None,
            },
        );
        let principal =
            authenticate(Some(&format!("Bearer {token}")), SECRET, &validation()).unwrap();
        assert_eq!(principal.subject, "dev-user-1");
        assert_eq!(principal.roles, roles);
        assert_eq!(principal.run_scope, None);
        assert_eq!(
            principal.claims,
            object(json!({
                "iss": "dev-idp",
                "aud": "dev-api",
                "sub": "dev-user-1",
                "iat": NOW,
                "exp": NOW + 480 * 60,
                "roles": ["developer", "ops"],
            }))
        );
    }

    #[test]
    fn minted_run_token_carries_run_id_stack_and_expires() {
        let roles = strings(&["admin"]);
        let scope = RunScope {
            run_id: "r1-1234".into(),
            stack: strings(&["A.md", "B.md"]),
        };
        let request = TokenRequest {
            issuer: "dev-idp",
            audience: "dev-api",
            subject: "alice",
            roles: &roles,
            issued_at: NOW,
            expires_at: NOW + 60,
            run: Some(&scope),
        };
        let token = mint(SECRET, &request);
        let principal =
            authenticate(Some(&format!("Bearer {token}")), SECRET, &validation()).unwrap();
        assert_eq!(principal.run_scope, Some(scope));
        assert_eq!(principal.claims.get("run_id"), Some(&json!("r1-1234")));
        assert_eq!(
            principal.claims.get("rbk_stack"),
            Some(&json!(["A.md", "B.md"]))
        );

        let later = Validation {
            now: NOW + 91,
            ..validation()
        };
        assert_eq!(
            authenticate(Some(&format!("Bearer {token}")), SECRET, &later),
            Err(AuthError::InvalidToken(JwtError::Expired))
        );
    }

    #[test]
    fn a_run_id_claim_makes_a_run_token_that_must_be_well_formed() {
        let principal = principal_with(json!({"run_id": "r1-x", "rbk_stack": []}));
        assert_eq!(
            principal.run_scope,
            Some(RunScope {
                run_id: "r1-x".into(),
                stack: Vec::new()
            })
        );
        for claims in [
            json!({"run_id": "r1-x"}),
            json!({"run_id": "r1-x", "rbk_stack": "A.md"}),
            json!({"run_id": "r1-x", "rbk_stack": ["A.md", 3]}),
            json!({"run_id": 7, "rbk_stack": []}),
            json!({"run_id": "", "rbk_stack": []}),
            json!({"run_id": null, "rbk_stack": []}),
        ] {
            let header = format!("Bearer {}", token_with(claims.clone()));
            assert_eq!(
                authenticate(Some(&header), SECRET, &validation()),
                Err(AuthError::BadRunScope),
                "{claims}"
            );
        }
        assert_eq!(
            principal_with(json!({"rbk_stack": ["A.md"]})).run_scope,
            None
        );
    }

    #[test]
    fn minted_token_with_no_roles_has_an_empty_array() {
        let token = mint(
            SECRET,
            &TokenRequest {
                issuer: "dev-idp",
                audience: "dev-api",
                subject: "nobody",
                roles: &[],
                issued_at: NOW,
                expires_at: NOW + 60,
                run: None,
            },
        );
        let claims = jwt::decode(&token, SECRET, &validation()).unwrap();
        assert_eq!(claims.get("roles"), Some(&json!([])));
    }

    #[test]
    fn random_secret_is_64_fresh_hex_chars() {
        let first = random_secret().unwrap();
        let second = random_secret().unwrap();
        assert_eq!(first.len(), 64);
        assert!(first
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(first, second);
        // 32 random bytes essentially never leave a hex digit unused across two secrets.
        let distinct: std::collections::BTreeSet<char> =
            first.chars().chain(second.chars()).collect();
        assert!(distinct.len() > 8, "{first} {second}");
    }
}
