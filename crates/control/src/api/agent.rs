//! Handler of agents' requests (`POST /v1/agent`).

use axum::{body::Bytes, extract::State as AxState, Json};
use serde_json::Value;

use super::{json_body, Api, ApiResult};
use crate::agent;

/// `POST /v1/agent`: a signed register, heartbeat or deregister.
pub(crate) async fn handle(AxState(api): AxState<Api>, body: Bytes) -> ApiResult<Json<Value>> {
    let env = json_body(&body)?;
    let out = agent::handle(
        api.writer(),
        api.identity(),
        api.agents(),
        api.proxies(),
        api.replicas(),
        env,
    )
    .await?;
    Ok(Json(out))
}
