//! Handlers of the CA's endpoints: join tokens, certificates, the CA's status and rotation.

use axum::{
    body::Bytes,
    extract::{Path, State as AxState},
    http::{header, HeaderMap},
    Json,
};
use serde_json::Value;

use super::{json_body, Api, ApiResult};
use crate::identity;

/// `POST /api/v1/tokens` (admin token): `{namespace, identity, ttlSeconds, uses}` →
/// `{token, spiffeId, expiresAt, uses}`.
pub(crate) async fn create_token(
    AxState(api): AxState<Api>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let req = json_body(&body)?;
    let out = identity::create_token(api.identity(), api.store(), req).await?;
    Ok(Json(out))
}

/// `GET /api/v1/tokens`.
pub(crate) async fn list_tokens(AxState(api): AxState<Api>) -> ApiResult<Json<Value>> {
    Ok(Json(identity::list_tokens(api.store()).await?))
}

/// `DELETE /api/v1/tokens/{id}`.
pub(crate) async fn revoke_token(
    AxState(api): AxState<Api>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(identity::revoke_token(api.store(), &id).await?))
}

/// `GET /api/v1/ca`.
pub(crate) async fn ca_status(AxState(api): AxState<Api>) -> ApiResult<Json<Value>> {
    Ok(Json(
        identity::ca_status(api.identity(), api.store()).await?,
    ))
}

/// `POST /api/v1/ca/rotate`: `{phase: begin|activate|finish, force}`.
pub(crate) async fn rotate(AxState(api): AxState<Api>, body: Bytes) -> ApiResult<Json<Value>> {
    let req = json_body(&body)?;
    Ok(Json(
        identity::rotate(api.identity(), api.store(), req).await?,
    ))
}

/// `POST /v1/certificates` (join token or a proof of the current certificate).
pub(crate) async fn sign(
    AxState(api): AxState<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let req = json_body(&body)?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    Ok(Json(
        identity::sign(api.identity(), api.store(), token, req).await?,
    ))
}

/// `POST /api/v1/viewer-tokens` (`{"name": …}`): a read-only token, shown once.
pub(crate) async fn create_viewer(
    AxState(api): AxState<Api>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let req: Value = if body.is_empty() {
        Value::Null
    } else {
        json_body(&body)?
    };
    let name = req["name"].as_str().unwrap_or("viewer");
    if name.len() > 64 {
        return Err(super::ApiError::BadRequest(
            "name: at most 64 characters".into(),
        ));
    }
    Ok(Json(api.viewers().create(api.store(), name).await?))
}

/// `GET /api/v1/viewer-tokens`.
pub(crate) async fn list_viewers(AxState(api): AxState<Api>) -> ApiResult<Json<Value>> {
    Ok(Json(api.viewers().list(api.store()).await?))
}

/// `DELETE /api/v1/viewer-tokens/{id}`.
pub(crate) async fn revoke_viewer(
    AxState(api): AxState<Api>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(api.viewers().revoke(api.store(), &id).await?))
}
