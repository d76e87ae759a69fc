//! The live status page: `GET /ui/` (an HTML shell; its script polls `GET /ui/status.json`
//! every second and renders it). Everything is embedded in the binary: no build step, no
//! external asset.
//!
//! Admin-only, like the cache API: the JSON answers to the admin `X-Auth-Token` header or to
//! the `imgcache_admin` cookie (`HttpOnly; SameSite=Strict`, path `/ui`) that the login form
//! (`POST /ui/login`, the token in the form body, never in a URL) sets. The cookie names a
//! server-side session ([`session`]), never the token. Both go through
//! [`crate::auth::check_admin`]. Without a valid token, `/ui/` is the login form and the JSON
//! a 401.

pub mod events;
pub mod progress;
pub mod session;
pub mod status;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::auth::{TOKEN_HEADER, check_admin};
use crate::error::ApiError;
use crate::state::AppState;

/// The session cookie: a session id (see [`session`]).
pub const COOKIE_NAME: &str = "imgcache_admin";
const PAGE: &str = include_str!("page.html");
const LOGIN: &str = include_str!("login.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");
/// Scripts and styles from this server only, no inline code, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// Longest login form body accepted.
const MAX_LOGIN: usize = 16 << 10;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(page))
        .route("/ui/status.json", get(status_json))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route(
            "/ui/page.js",
            get(|| async { asset("text/javascript", SCRIPT) }),
        )
        .route("/ui/page.css", get(|| async { asset("text/css", STYLE) }))
}

/// Ok when the request carries an admin token, in the header or the cookie. A token that is
/// not admin is a 401 here too: the page's answer to both is to log in again.
async fn authorise(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let session = cookie_session(headers);
    let result = match (headers.contains_key(TOKEN_HEADER), session) {
        (false, Some(id)) => {
            let Some(token) = state.sessions.token(&id) else {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "the session ended (logged out, expired or the server restarted): log in again",
                ));
            };
            let mut h = HeaderMap::new();
            let v = HeaderValue::from_str(&token)
                .map_err(|_| ApiError::new(StatusCode::UNAUTHORIZED, "a malformed session"))?;
            h.insert(TOKEN_HEADER, v);
            check_admin(state, &h).await
        }
        _ => check_admin(state, headers).await,
    };
    result.map_err(|e| match e.status {
        StatusCode::FORBIDDEN => ApiError::new(StatusCode::UNAUTHORIZED, e.message),
        _ => e,
    })
}

/// The session id of the `imgcache_admin` cookie, if the request has one.
fn cookie_session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v.trim().to_string())
        .filter(|t| !t.is_empty())
}

async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match authorise(&state, &headers).await {
        Ok(()) => html(
            StatusCode::OK,
            PAGE.replace("{{VERSION}}", env!("CARGO_PKG_VERSION")),
        ),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            login_page(StatusCode::UNAUTHORIZED, None)
        }
        Err(e) => login_page(e.status, Some(&e.message)),
    }
}

async fn status_json(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = authorise(&state, &headers).await {
        return e.into_response();
    }
    match status::build(&state).await {
        Ok(s) => {
            let mut resp = axum::Json(s).into_response();
            resp.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /ui/login` with `token=...` (form-encoded): the cookie and a redirect to the page,
/// or the form again with a 401.
async fn login(State(state): State<AppState>, body: Bytes) -> Response {
    if body.len() > MAX_LOGIN {
        return login_page(StatusCode::PAYLOAD_TOO_LARGE, Some("the form is too large"));
    }
    let token = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mut h = HeaderMap::new();
    let Ok(v) = HeaderValue::from_str(&token) else {
        return login_page(StatusCode::UNAUTHORIZED, Some("that token is not valid"));
    };
    h.insert(TOKEN_HEADER, v);
    if let Err(e) = authorise(&state, &h).await {
        let msg = match e.status {
            StatusCode::UNAUTHORIZED => "that token is not an admin token",
            _ => e.message.as_str(),
        };
        return login_page(e.status, Some(msg));
    }
    let value = state.sessions.start(&token);
    let secure = if state.config.tls_cert.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!("{COOKIE_NAME}={value}; Path=/ui; HttpOnly; SameSite=Strict{secure}");
    see_other(Some(cookie))
}

/// `POST /ui/logout`: the session ends and the cookie is cleared.
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_session(&headers) {
        state.sessions.end(&id);
    }
    see_other(Some(format!(
        "{COOKIE_NAME}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"
    )))
}

fn see_other(cookie: Option<String>) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(LOCATION, HeaderValue::from_static("/ui/"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(SET_COOKIE, c);
    }
    resp
}

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    let msg = message
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(m)))
        .unwrap_or_default();
    html(status, LOGIN.replace("{{MESSAGE}}", &msg))
}

fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// Text for HTML element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; imgcache_admin=0123abcd; b=2"),
        );
        assert_eq!(cookie_session(&h).as_deref(), Some("0123abcd"));
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("imgcache_admin="));
        assert_eq!(cookie_session(&h), None);
        assert_eq!(cookie_session(&HeaderMap::new()), None);
    }

    #[test]
    fn messages_are_escaped() {
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}
