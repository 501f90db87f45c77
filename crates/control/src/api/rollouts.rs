//! `/api/v1/rollouts`: progressive delivery's state and an operator's hand on it.

use axum::{
    extract::{Path, Query, State as AxState},
    Json,
};
use serde::Deserialize;
use trellis_model::resource::NamespacedName;

use super::{Api, ApiResult};
use crate::rollout::{Action, Status};

/// What `GET /api/v1/rollouts` takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    namespace: Option<String>,
    name: Option<String>,
}

/// `GET /api/v1/rollouts`: every rollout (of a namespace, or one by name).
pub(crate) async fn list(
    AxState(api): AxState<Api>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<Status>>> {
    let all = api
        .rollouts()
        .statuses(q.namespace.as_deref(), q.name.as_deref())
        .await?;
    Ok(Json(all))
}

/// `POST /api/v1/rollouts/{ns}/{name}/{action}`: pause, resume, abort or promote; the
/// rollout as it is then.
pub(crate) async fn act(
    AxState(api): AxState<Api>,
    Path((namespace, name, action)): Path<(String, String, String)>,
) -> ApiResult<Json<Status>> {
    let action: Action = action.parse()?;
    let id = NamespacedName { namespace, name };
    api.rollouts().act(&id, action).await?;
    let mut now = api
        .rollouts()
        .statuses(Some(&id.namespace), Some(&id.name))
        .await?;
    Ok(Json(now.remove(0)))
}
