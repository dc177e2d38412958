//! Authentication of upgrade and HTTP requests.
//!
//! The gateway asks an [`Authenticator`] for the user of every request, and for a WebSocket
//! also when the credential expires ([`Authenticator::identify`]): the engine refuses every
//! command after that instant and closes the socket with 4003 unless the client sent a
//! `refresh`, whose token the gateway checks with [`Authenticator::verify_token`]. Two are
//! provided: [`JwtAuth`] (HS256, `sub` = user id, `exp` required and enforced, also on the live
//! socket) and [`DevAuth`] (`?user=<id>` without a token, never expires — for local development
//! only). Hosts plug their own (sessions, OAuth introspection, mTLS…) by implementing the trait.
//!
//! Tokens are read from `Authorization: Bearer <JWT>` or, for browsers that cannot set headers
//! on a WebSocket, from the `token` query parameter.
//!
//! ```
//! use chat_transport::auth::JwtAuth;
//! let auth = JwtAuth::new(b"secret");
//! let token = auth.issue("alice", std::time::Duration::from_secs(60)).unwrap();
//! assert_eq!(auth.verify(&token).unwrap().as_str(), "alice");
//! assert!(JwtAuth::new(b"other secret").verify(&token).is_err());
//! ```

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chat_core::{Error, UserId};
use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What an authenticator sees of a request.
#[derive(Clone, Copy, Debug)]
pub struct AuthRequest<'a> {
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The raw query string, if any.
    pub query: Option<&'a str>,
}

impl<'a> AuthRequest<'a> {
    /// The value of a query parameter (percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query?;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// The bearer token from `Authorization` or the `token` query parameter.
    pub fn bearer_token(&self) -> Option<String> {
        if let Some(value) = self.headers.get(http::header::AUTHORIZATION)
            && let Ok(s) = value.to_str()
            && let Some(token) = s
                .strip_prefix("Bearer ")
                .or_else(|| s.strip_prefix("bearer "))
        {
            return Some(token.trim().to_owned());
        }
        self.query_param("token")
    }
}

pub use chat_core::transport::Credential;

/// Turns a request into a user, or [`Error::Unauthorized`]. The gateway asks
/// [`Authenticator::identify`] for every request (HTTP and WebSocket); its default asks
/// [`Authenticator::authenticate`], so an authenticator without expiry implements only that.
#[async_trait]
pub trait Authenticator: Send + Sync + fmt::Debug + 'static {
    /// The authenticated user of the request.
    async fn authenticate(&self, request: AuthRequest<'_>) -> Result<UserId, Error>;

    /// The request's credential: its user and when it expires (used for WebSockets, whose
    /// session ends at that instant unless refreshed). The default never expires: override it
    /// when credentials do.
    async fn identify(&self, request: AuthRequest<'_>) -> Result<Credential, Error> {
        Ok(Credential::new(self.authenticate(request).await?))
    }

    /// Checks a token presented on a live socket (the `refresh` command). The default refuses
    /// every token (`Unauthorized`): override it together with [`Authenticator::identify`].
    async fn verify_token(&self, token: &str) -> Result<Credential, Error> {
        let _ = token;
        Err(Error::Unauthorized(
            "this server does not refresh tokens on a live socket".into(),
        ))
    }
}

/// The claims read. Optional here so that a token lacking one is refused by the validation
/// with the claim's name ("token lacks the `sub` claim") rather than as a malformed token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
}

/// HS256 JWT: the user id in `sub`, `exp` required and enforced to the second (no leeway: a
/// socket's session ends at `exp` too, so a token accepted at connect must not be expired).
pub struct JwtAuth {
    /// Verifies signatures.
    decoding: DecodingKey,
    /// Signs tokens (for [`JwtAuth::issue`]: tests, dev tools, token endpoints).
    encoding: EncodingKey,
    /// HS256 only, `exp` required.
    validation: Validation,
}

impl fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuth").finish_non_exhaustive()
    }
}

impl JwtAuth {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        // Identity providers often add `aud`; accept it unless the host asks to check it.
        validation.validate_aud = false;
        Self {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
        }
    }

    /// Also require the `aud` claim to be one of `audiences`.
    pub fn with_audience(mut self, audiences: &[&str]) -> Self {
        self.validation.set_audience(audiences);
        self.validation.validate_aud = true;
        self
    }

    /// Checks a token and returns its user.
    pub fn verify(&self, token: &str) -> Result<UserId, Error> {
        self.verify_credential(token).map(|c| c.user)
    }

    /// Checks a token and returns its user and expiry (`exp` in milliseconds).
    pub fn verify_credential(&self, token: &str) -> Result<Credential, Error> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                // Say what is wrong without echoing library internals.
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired".into(),
                    ErrorKind::ImmatureSignature => "token not valid yet".into(),
                    ErrorKind::InvalidSignature => "token signature does not match".into(),
                    ErrorKind::InvalidAudience => "token audience not accepted".into(),
                    // Only `sub` and `exp` are required: name the missing one.
                    ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                        "sub" | "exp" => format!("token lacks the `{claim}` claim"),
                        _ => "token lacks a required claim".to_owned(),
                    },
                    ErrorKind::InvalidAlgorithm => "token must be HS256".into(),
                    _ => "malformed token".to_owned(),
                };
                Error::Unauthorized(why.into())
            })?;
        let lacks =
            |claim: &str| Error::Unauthorized(format!("token lacks the `{claim}` claim").into());
        let sub = data.claims.sub.ok_or_else(|| lacks("sub"))?;
        let exp = data.claims.exp.ok_or_else(|| lacks("exp"))?;
        let user = UserId::parse(&sub)
            .map_err(|_| Error::Unauthorized("token subject is not a valid user id".into()))?;
        Ok(Credential::new(user).expiring_at(exp.saturating_mul(1000)))
    }

    /// Signs a token for `user` valid for `ttl`.
    pub fn issue(&self, user: &str, ttl: Duration) -> Result<String, Error> {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d + ttl)
            .map_err(|_| Error::internal("clock before 1970"))?
            .as_secs();
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: Some(user.to_owned()),
                exp: Some(exp),
            },
            &self.encoding,
        )
        .map_err(|e| Error::internal(format!("cannot sign token: {e}")))
    }
}

#[async_trait]
impl Authenticator for JwtAuth {
    async fn authenticate(&self, request: AuthRequest<'_>) -> Result<UserId, Error> {
        self.identify(request).await.map(|c| c.user)
    }

    async fn identify(&self, request: AuthRequest<'_>) -> Result<Credential, Error> {
        let token = request
            .bearer_token()
            .ok_or_else(|| Error::Unauthorized("missing bearer token".into()))?;
        self.verify_credential(&token)
    }

    async fn verify_token(&self, token: &str) -> Result<Credential, Error> {
        self.verify_credential(token)
    }
}

/// The gateway's [`TokenVerifier`](chat_core::transport::TokenVerifier) for `refresh`: the
/// authenticator that let the socket in.
#[derive(Debug)]
pub(crate) struct RefreshVerifier(pub(crate) std::sync::Arc<dyn Authenticator>);

#[async_trait]
impl chat_core::transport::TokenVerifier for RefreshVerifier {
    async fn verify(&self, token: &str) -> Result<Credential, Error> {
        self.0.verify_token(token).await
    }
}

/// Development mode: `?user=<id>` (or the `X-Chat-User` header) is trusted without a token.
/// Never use it in production: anyone can be anyone.
#[derive(Debug, Default, Clone, Copy)]
pub struct DevAuth;

#[async_trait]
impl Authenticator for DevAuth {
    async fn authenticate(&self, request: AuthRequest<'_>) -> Result<UserId, Error> {
        let user = request
            .query_param("user")
            .or_else(|| {
                request
                    .headers
                    .get("x-chat-user")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .ok_or_else(|| Error::Unauthorized("dev mode: pass ?user=<id>".into()))?;
        UserId::parse(&user).map_err(|e| Error::Unauthorized(e.to_string().into()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A token signed with `secret` carrying exactly `claims`.
    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn a_token_missing_sub_or_exp_is_refused_with_the_claim_named() {
        let auth = JwtAuth::new(b"s");
        let later = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        for (claims, named) in [
            (serde_json::json!({"exp": later}), "`sub`"),
            (serde_json::json!({"sub": "alice"}), "`exp`"),
        ] {
            let err = auth.verify(&token(b"s", claims)).unwrap_err();
            assert_eq!(err.code(), chat_core::ErrorCode::Unauthorized);
            assert!(err.to_string().contains(named), "{err} should name {named}");
        }
        let ok = token(b"s", serde_json::json!({"sub": "alice", "exp": later}));
        assert_eq!(auth.verify(&ok).unwrap(), UserId::from("alice"));
    }
}
