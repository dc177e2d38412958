//! The HTTP API (`/api/...`): conversations, history pages, members, presence, as JSON, with
//! the engine's errors mapped to HTTP statuses.

use bytes::Bytes;
use chat_core::model::ConversationKind;
use chat_core::{ConversationId, Error, UserId};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::gateway::{Gateway, GatewayResponse};

impl Gateway {
    pub(crate) async fn api<B>(
        &self,
        req: Request<B>,
        user: &UserId,
        path: &[String],
    ) -> Result<GatewayResponse, Error>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let chat = &self.inner.chat;
        let query = Query(req.uri().query().map(str::to_owned));
        let method = req.method().clone();
        let segs: Vec<&str> = path.iter().map(String::as_str).collect();
        match (&method, segs.as_slice()) {
            (&Method::POST, ["conversations"]) => {
                #[derive(Deserialize)]
                struct Create {
                    kind: ConversationKind,
                    #[serde(default)]
                    members: Vec<UserId>,
                    #[serde(default)]
                    name: Option<String>,
                }
                let body: Create = self.json_body(req).await?;
                let view = chat
                    .create_conversation(user, body.kind, &body.members, body.name)
                    .await?;
                Ok(json_response(StatusCode::OK, &view))
            }
            (&Method::GET, ["conversations"]) => {
                let limit = query.usize("limit")?.unwrap_or(20);
                let after = query.u64("after")?;
                let page = chat.list_conversations(user, after, limit).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "conversations": page.items,
                        "next": page.next.map(|n| n.to_string()),
                    }),
                ))
            }
            (&Method::GET, ["conversations", id]) => {
                let id = parse_id(id)?;
                Ok(json_response(
                    StatusCode::OK,
                    &chat.conversation_view(user, id).await?,
                ))
            }
            (&Method::GET, ["conversations", id, "messages"]) => {
                let id = parse_id(id)?;
                let limit = query.usize("limit")?.unwrap_or(50);
                let before = query.u64("before")?;
                let page = chat.history(user, id, before, limit).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"messages": page.items, "next": page.next}),
                ))
            }
            (&Method::POST, ["conversations", id, "members"]) => {
                let id = parse_id(id)?;
                #[derive(Deserialize)]
                struct Add {
                    user_ids: Vec<UserId>,
                }
                let body: Add = self.json_body(req).await?;
                let added = chat.add_members(user, id, &body.user_ids).await?;
                Ok(json_response(StatusCode::OK, &json!({"added": added})))
            }
            (&Method::DELETE, ["conversations", id, "members", member]) => {
                let id = parse_id(id)?;
                let member = UserId::parse(&percent_decode(member))?;
                let removed = chat.remove_member(user, id, &member).await?;
                Ok(json_response(StatusCode::OK, &json!({"removed": removed})))
            }
            (&Method::GET, ["presence"]) => {
                let users: Vec<UserId> = query
                    .get("user_ids")
                    .unwrap_or_default()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(UserId::parse)
                    .collect::<Result<_, _>>()?;
                let presence = chat.presence(&users).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"presence": presence}),
                ))
            }
            _ => Err(Error::not_found(format!(
                "no route for {method} /api/{}",
                path.join("/")
            ))),
        }
    }

    async fn json_body<T: serde::de::DeserializeOwned, B>(
        &self,
        req: Request<B>,
    ) -> Result<T, Error>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let limit = self.inner.config.max_body_bytes;
        let body = Limited::new(req.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Error::TooLarge {
                        size: limit + 1,
                        limit,
                    }
                } else {
                    Error::invalid(format!("could not read the body: {e}"))
                }
            })?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| Error::invalid(format!("invalid JSON body: {e}")))
    }
}

/// Query-string access with typed errors.
struct Query(Option<String>);

impl Query {
    fn get(&self, name: &str) -> Option<String> {
        let q = self.0.as_deref()?;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
    fn u64(&self, name: &str) -> Result<Option<u64>, Error> {
        self.get(name)
            .filter(|v| !v.is_empty() && v != "null")
            .map(|v| {
                v.parse()
                    .map_err(|_| Error::invalid(format!("{name} must be a non-negative integer")))
            })
            .transpose()
    }
    fn usize(&self, name: &str) -> Result<Option<usize>, Error> {
        Ok(self
            .u64(name)?
            .map(|v| usize::try_from(v).unwrap_or(usize::MAX)))
    }
}

fn parse_id(s: &str) -> Result<ConversationId, Error> {
    s.parse()
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

pub(crate) fn internal() -> GatewayResponse {
    let mut r = Response::new(Full::new(Bytes::from_static(
        br#"{"error":{"code":"internal","message":"internal error"}}"#,
    )));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

pub(crate) fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> GatewayResponse {
    match serde_json::to_vec(value) {
        Ok(body) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| internal()),
        Err(_) => internal(),
    }
}

/// `{"error": {"code", "message"}}` with the code's status.
pub fn error_response(err: &Error) -> GatewayResponse {
    let code = err.code();
    let status = match err {
        // A backend outage is temporary: 503 tells clients and load balancers to retry.
        Error::Unavailable { .. } | Error::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    let body: Value = json!({"error": {"code": code.as_str(), "message": err.client_message()}});
    let mut resp = json_response(status, &body);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}
