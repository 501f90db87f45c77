//! Stage `balance`: admission to the cluster (its circuit breaker: requests in flight, then a
//! bounded pending queue) and the choice of an endpoint (the cluster's load balancer,
//! locality, outlier ejections, and a retry's wish to go elsewhere).

use std::{sync::Arc, time::Instant};

use tokio::sync::OwnedSemaphorePermit;

use crate::{
    cluster::{Cluster, Endpoint},
    error::{Error, Kind},
};

/// Take an in-flight slot of `cluster`, waiting in its pending queue for at most its connect
/// timeout.
pub(crate) async fn admit(cluster: &Cluster) -> Result<OwnedSemaphorePermit, Error> {
    cluster
        .admit(cluster.policy().connect_timeout)
        .await
        .map_err(|e| Error::new(Kind::Overloaded, e.to_string()))
}

/// An endpoint of `cluster` for a try starting at `now`, not `avoid` (the previous try's)
/// while another is usable.
pub(crate) fn pick(
    cluster: &Cluster,
    now: Instant,
    avoid: Option<&Arc<Endpoint>>,
) -> Result<Arc<Endpoint>, Error> {
    cluster.pick_avoiding(now, avoid).ok_or_else(|| {
        Error::new(
            Kind::NoEndpoint,
            format!(
                "cluster {} has no healthy endpoint ({} configured, all ejected or none)",
                cluster.key,
                cluster.endpoints.len()
            ),
        )
    })
}
