//! Handlers of the single pane (`/ui/`): the embedded page and its session.

use axum::{
    body::Bytes,
    extract::State as AxState,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
};

use super::Api;
use crate::pane::{form_value, CSS, INDEX, JS};

fn misdirected() -> Response {
    (
        StatusCode::MISDIRECTED_REQUEST,
        "this control plane does not answer to that host name\n",
    )
        .into_response()
}

fn asset(api: &Api, headers: &HeaderMap, ctype: &'static str, body: &'static str) -> Response {
    if !api.pane().host_ok(headers) {
        return misdirected();
    }
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: to the pane.
pub(crate) async fn root() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui/`.
pub(crate) async fn index(AxState(api): AxState<Api>, headers: HeaderMap) -> Response {
    asset(&api, &headers, "text/html; charset=utf-8", INDEX)
}

/// `GET /ui/pane.js`.
pub(crate) async fn js(AxState(api): AxState<Api>, headers: HeaderMap) -> Response {
    asset(&api, &headers, "text/javascript; charset=utf-8", JS)
}

/// `GET /ui/pane.css`.
pub(crate) async fn css(AxState(api): AxState<Api>, headers: HeaderMap) -> Response {
    asset(&api, &headers, "text/css; charset=utf-8", CSS)
}

/// `POST /ui/session` (form `token=`): a session for the admin token.
pub(crate) async fn sign_in(
    AxState(api): AxState<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let pane = api.pane();
    if !pane.host_ok(&headers) {
        return misdirected();
    }
    let given = form_value(&body, "token").unwrap_or_default();
    let holder = if api.token_accepts(&given) {
        None
    } else if let Some(id) = api.viewers().which(api.store(), &given).await {
        Some(id)
    } else {
        return (
            StatusCode::UNAUTHORIZED,
            "neither the admin token nor a read-only one\n",
        )
            .into_response();
    };
    match pane.open(holder) {
        Some(id) => (
            StatusCode::NO_CONTENT,
            [(header::SET_COOKIE, pane.cookie(&id))],
        )
            .into_response(),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "no session\n").into_response(),
    }
}

/// `GET /ui/session`: whether the request rides on a session, and whether it may only read.
pub(crate) async fn whoami(AxState(api): AxState<Api>, headers: HeaderMap) -> Response {
    match api.pane().session(&headers) {
        Some(None) => axum::Json(serde_json::json!({ "readOnly": false })).into_response(),
        Some(Some(id)) if api.viewers().stands(api.store(), &id).await => {
            axum::Json(serde_json::json!({ "readOnly": true })).into_response()
        }
        _ => (StatusCode::UNAUTHORIZED, "no session\n").into_response(),
    }
}

/// `DELETE /ui/session`: sign out.
pub(crate) async fn sign_out(AxState(api): AxState<Api>, headers: HeaderMap) -> Response {
    api.pane().close(&headers);
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, api.pane().cookie(""))],
    )
        .into_response()
}

/// `GET /ui/enter?code=`: a sign-in link (from `POST /api/v1/ui/links`) opens a session,
/// once, and leads to the page.
pub(crate) async fn enter(
    AxState(api): AxState<Api>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let pane = api.pane();
    if !pane.host_ok(&headers) {
        return misdirected();
    }
    let code = query
        .as_deref()
        .and_then(|q| form_value(q.as_bytes(), "code"))
        .unwrap_or_default();
    match pane.enter(&code) {
        Some(id) => (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, pane.cookie(&id)),
                (header::LOCATION, "/ui/".to_string()),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ],
        )
            .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::CACHE_CONTROL, "no-store")],
            "this sign-in link was used already or has expired: `trellis dashboard` prints a new one\n",
        )
            .into_response(),
    }
}

/// `POST /api/v1/ui/links` (admin): a sign-in link for the page, good once for 15 minutes.
pub(crate) async fn new_link(AxState(api): AxState<Api>) -> Response {
    match api.pane().link() {
        Some(code) => axum::Json(serde_json::json!({
            "path": format!("/ui/enter?code={code}"),
            "expiresInSeconds": 900,
        }))
        .into_response(),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "no link\n").into_response(),
    }
}
