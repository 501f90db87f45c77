//! The mesh in Envoy's standard resource types, for Envoy and proxyless gRPC clients
//! (gRFC A27): per service port, a Listener named `HOST:PORT` (e.g. `catalog.shop:80`) with an
//! `api_listener` HttpConnectionManager that takes its routes by RDS over ADS and ends its
//! filters with the Router; a RouteConfiguration of the same name; per cluster an EDS Cluster
//! and a ClusterLoadAssignment whose localities carry weights, and whose endpoints carry
//! environment and workload in `filter_metadata["trellis.dev"]`.
//!
//! An Envoy sidecar names its workload in its node metadata (as a Trellis proxy does); its
//! Listener discovery then also gets socket listeners, one per upstream the workload declares
//! (`spec.upstreams[].bind`), named `outbound|ADDR:PORT`: an HTTP, HTTP/2 or gRPC port gets
//! an HttpConnectionManager taking the service port's RouteConfiguration by RDS, a TCP port a
//! TcpProxy to its cluster. HTTP/2 and gRPC clusters say so in their protocol options, which
//! Envoy needs to speak HTTP/2 upstream.
//!
//! Every HttpConnectionManager has the fault filter (empty) before the Router, and a route
//! with a `trellis.dev/Fault` filter overrides it (`typed_per_filter_config`, gRFC A33 for
//! proxyless gRPC): the route's first delay and first abort (the filter holds one of each),
//! applied per request rather than per try as a Trellis proxy does. A route's
//! `RequestMirror` filters become `request_mirror_policies` (Envoy; gRPC does not mirror).

use std::{collections::BTreeMap, time::Duration};

use trellis_model::{
    proxy::{
        BindConfig, ClusterConfig, EndpointConfig, FaultConfig, PathMatchConfig, PortConfig,
        RouteConfig, ValueMatcher,
    },
    resource::{LbKind, NamespacedName, Protocol},
    ProxyConfig,
};
use trellis_xds::{
    envoy_types::{
        pb::{
            envoy::{
                config::{
                    cluster::v3::{
                        cluster::{
                            ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
                        },
                        Cluster,
                    },
                    core::v3::{
                        address, config_source::ConfigSourceSpecifier, socket_address, Address,
                        AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality,
                        Metadata, RuntimeFractionalPercent, SocketAddress,
                    },
                    endpoint::v3::{
                        lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint,
                        LocalityLbEndpoints,
                    },
                    listener::v3::{filter, ApiListener, Filter, FilterChain, Listener},
                    route::v3::{
                        header_matcher::HeaderMatchSpecifier,
                        query_parameter_matcher::QueryParameterMatchSpecifier,
                        route,
                        route_action::{
                            ClusterNotFoundResponseCode, ClusterSpecifier, RequestMirrorPolicy,
                        },
                        route_match::PathSpecifier,
                        weighted_cluster::ClusterWeight,
                        HeaderMatcher, QueryParameterMatcher, Route, RouteAction,
                        RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
                    },
                },
                extensions::filters::{
                    common::fault::v3::{fault_delay::FaultDelaySecifier, FaultDelay},
                    http::{
                        fault::v3::{fault_abort::ErrorType, FaultAbort, HttpFault},
                        router::v3::Router,
                    },
                    network::{
                        http_connection_manager::v3::{
                            http_connection_manager::RouteSpecifier, http_filter,
                            HttpConnectionManager, HttpFilter, Rds,
                        },
                        tcp_proxy::v3::{tcp_proxy, TcpProxy},
                    },
                },
                extensions::upstreams::http::v3::{
                    http_protocol_options::{
                        explicit_http_config::ProtocolConfig, ExplicitHttpConfig,
                        UpstreamProtocolOptions,
                    },
                    HttpProtocolOptions,
                },
                r#type::{
                    matcher::v3::{string_matcher::MatchPattern, RegexMatcher, StringMatcher},
                    v3::{fractional_percent::DenominatorType, FractionalPercent},
                },
            },
            google::protobuf::{
                value::Kind, Any, Duration as PbDuration, Struct, UInt32Value, Value,
            },
        },
        util::pack_any,
    },
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, METADATA_NAMESPACE, ROUTE_TYPE,
};

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn dur(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The name of a service port's Listener and RouteConfiguration: `HOST:PORT`.
pub(crate) fn listener_name(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

fn wanted(names: &[String], name: &str) -> bool {
    names.is_empty() || names.iter().any(|n| n == "*" || n == name)
}

/// Resources of `type_url`, limited to `names` (all when empty or `*`).
pub(crate) fn resources(
    mesh: &ProxyConfig,
    type_url: &str,
    names: &[String],
) -> Result<Vec<Any>, String> {
    let mut out = Vec::new();
    match type_url {
        LISTENER_TYPE => {
            for (id, svc) in &mesh.services {
                for p in &svc.ports {
                    let name = listener_name(&svc.host, p.port);
                    if wanted(names, &name) {
                        out.push(pack_any(listener(&name, id)));
                    }
                }
            }
        }
        ROUTE_TYPE => {
            for svc in mesh.services.values() {
                for p in &svc.ports {
                    let name = listener_name(&svc.host, p.port);
                    if wanted(names, &name) {
                        out.push(pack_any(route_config(&name, &svc.host, p)));
                    }
                }
            }
        }
        CLUSTER_TYPE => {
            for (key, c) in &mesh.clusters {
                if wanted(names, key) {
                    out.push(pack_any(cluster(key, c)));
                }
            }
        }
        ENDPOINT_TYPE => {
            for (key, c) in &mesh.clusters {
                if wanted(names, key) {
                    out.push(pack_any(load_assignment(key, &c.endpoints)));
                }
            }
        }
        other => return Err(format!("unknown resource type {other:?}")),
    }
    Ok(out)
}

/// An HttpConnectionManager taking RouteConfiguration `name` by RDS over ADS, ending with the
/// Router.
fn hcm(name: &str, id: &NamespacedName) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: format!("{}_{}", id.namespace, id.name),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_string(),
        })),
        http_filters: vec![
            // No fault unless a route says so (`fault`).
            HttpFilter {
                name: FAULT_FILTER.into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                    HttpFault::default(),
                ))),
                ..Default::default()
            },
            HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                    Router::default(),
                ))),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

/// The fault filter's name in every HttpConnectionManager, which a route's override names.
const FAULT_FILTER: &str = "envoy.filters.http.fault";

fn per_million(n: u32) -> FractionalPercent {
    FractionalPercent {
        numerator: n,
        denominator: DenominatorType::Million as i32,
    }
}

/// A route's faults as the fault filter's override: its first delay and its first abort (the
/// filter holds one of each); an abort answers with the gRPC status on a gRPC port, the HTTP
/// status on others. None without faults.
fn fault(faults: &[FaultConfig], protocol: Protocol) -> Option<HttpFault> {
    let delay = faults.iter().find_map(|f| match f {
        FaultConfig::Delay {
            per_million: n,
            duration,
        } => Some(FaultDelay {
            percentage: Some(per_million(*n)),
            fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(dur(*duration))),
        }),
        FaultConfig::Abort { .. } => None,
    });
    let abort = faults.iter().find_map(|f| match f {
        FaultConfig::Abort {
            per_million: n,
            status,
            grpc_status,
        } => Some(FaultAbort {
            percentage: Some(per_million(*n)),
            error_type: Some(if protocol == Protocol::Grpc {
                ErrorType::GrpcStatus(*grpc_status)
            } else {
                ErrorType::HttpStatus(u32::from(*status))
            }),
            ..Default::default()
        }),
        FaultConfig::Delay { .. } => None,
    });
    (delay.is_some() || abort.is_some()).then(|| HttpFault {
        delay,
        abort,
        ..Default::default()
    })
}

fn listener(name: &str, id: &NamespacedName) -> Listener {
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(hcm(name, id))),
        }),
        ..Default::default()
    }
}

/// The name of a sidecar's listener for one declared upstream.
pub(crate) fn outbound_name(b: &BindConfig) -> String {
    format!("outbound|{}", b.bind)
}

/// A sidecar's socket listeners, from the translation for its workload (`cfg.tcp_binds`).
pub(crate) fn sidecar_listeners(cfg: &ProxyConfig, names: &[String]) -> Vec<Any> {
    let mut out = Vec::new();
    for b in &cfg.tcp_binds {
        let name = outbound_name(b);
        if !wanted(names, &name) {
            continue;
        }
        let Some(svc) = cfg.services.get(&b.service) else {
            continue;
        };
        let f = match b.protocol {
            Protocol::Tcp => Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(TcpProxy {
                    stat_prefix: b.cluster.clone(),
                    cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                        b.cluster.clone(),
                    )),
                    ..Default::default()
                }))),
            },
            Protocol::Http | Protocol::Http2 | Protocol::Grpc => Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm(
                    &listener_name(&svc.host, b.port),
                    &b.service,
                )))),
            },
        };
        out.push(pack_any(Listener {
            name,
            address: Some(socket(b.bind)),
            filter_chains: vec![FilterChain {
                filters: vec![f],
                ..Default::default()
            }],
            ..Default::default()
        }));
    }
    out
}

fn socket(a: std::net::SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(a.port().into())),
            ..Default::default()
        })),
    }
}

fn string_match(m: &ValueMatcher) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(match m {
            ValueMatcher::Exact(v) => MatchPattern::Exact(v.clone()),
            ValueMatcher::Regex(r) => MatchPattern::SafeRegex(RegexMatcher {
                regex: r.0.as_str().to_string(),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

fn route_config(name: &str, host: &str, p: &PortConfig) -> RouteConfiguration {
    let mut routes = Vec::new();
    for r in &p.routes {
        // A route with no match conditions matches everything.
        let matches = if r.matches.is_empty() {
            vec![Default::default()]
        } else {
            r.matches.clone()
        };
        for m in &matches {
            let path = match &m.path {
                None => PathSpecifier::Prefix("/".into()),
                Some(PathMatchConfig::Exact(p)) => PathSpecifier::Path(p.clone()),
                // Gateway API prefixes match whole segments, as Envoy's path_separated_prefix.
                Some(PathMatchConfig::Prefix(p)) if p == "/" => PathSpecifier::Prefix("/".into()),
                Some(PathMatchConfig::Prefix(p)) => {
                    PathSpecifier::PathSeparatedPrefix(p.trim_end_matches('/').to_string())
                }
                Some(PathMatchConfig::Regex(r)) => PathSpecifier::SafeRegex(RegexMatcher {
                    regex: r.0.as_str().to_string(),
                    ..Default::default()
                }),
            };
            let mut headers: Vec<HeaderMatcher> = m
                .headers
                .iter()
                .map(|(n, v)| HeaderMatcher {
                    name: n.clone(),
                    header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(string_match(
                        v,
                    ))),
                    ..Default::default()
                })
                .collect();
            if let Some(method) = &m.method {
                headers.push(HeaderMatcher {
                    name: ":method".into(),
                    header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(string_match(
                        &ValueMatcher::Exact(method.clone()),
                    ))),
                    ..Default::default()
                });
            }
            let query_parameters = m
                .query
                .iter()
                .map(|(n, v)| QueryParameterMatcher {
                    name: n.clone(),
                    query_parameter_match_specifier: Some(
                        QueryParameterMatchSpecifier::StringMatch(string_match(v)),
                    ),
                })
                .collect();
            let typed_per_filter_config = fault(&r.faults, p.protocol)
                .map(|f| (FAULT_FILTER.to_string(), pack_any(f)))
                .into_iter()
                .collect();
            routes.push(Route {
                name: r.name.to_string(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(path),
                    headers,
                    query_parameters,
                    ..Default::default()
                }),
                action: Some(route::Action::Route(route_action(r))),
                typed_per_filter_config,
                ..Default::default()
            });
        }
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: vec![
                name.to_string(),
                host.to_string(),
                format!("{host}.mesh"),
                format!("{host}.mesh:{}", p.port),
            ],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route_action(r: &RouteConfig) -> RouteAction {
    let cluster_specifier = if r.backends.len() == 1 {
        ClusterSpecifier::Cluster(r.backends[0].cluster.clone())
    } else {
        ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: r
                .backends
                .iter()
                .map(|b| ClusterWeight {
                    name: b.cluster.clone(),
                    weight: Some(UInt32Value { value: b.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    // A backend that does not resolve has no cluster: Envoy's answer for its share is 503 by
    // default, and the Gateway API asks for 500.
    let cluster_not_found_response_code = if r.backends.iter().any(|b| b.unresolved.is_some()) {
        ClusterNotFoundResponseCode::InternalServerError as i32
    } else {
        ClusterNotFoundResponseCode::ServiceUnavailable as i32
    };
    RouteAction {
        cluster_specifier: Some(cluster_specifier),
        cluster_not_found_response_code,
        request_mirror_policies: r
            .mirrors
            .iter()
            .map(|m| RequestMirrorPolicy {
                cluster: m.cluster.clone(),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(per_million(m.per_million)),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        timeout: r.timeout.map(dur),
        retry_policy: r.retry.as_ref().map(|rt| {
            use trellis_xds::envoy_types::pb::envoy::config::route::v3::RetryPolicy;
            let mut on = vec!["connect-failure", "reset"];
            if !rt.codes.is_empty() {
                on.push("retriable-status-codes");
            }
            RetryPolicy {
                retry_on: on.join(","),
                num_retries: Some(UInt32Value { value: rt.attempts }),
                retriable_status_codes: rt.codes.iter().map(|c| *c as u32).collect(),
                per_try_timeout: rt.per_try_timeout.map(dur),
                ..Default::default()
            }
        }),
        ..Default::default()
    }
}

fn cluster(key: &str, c: &ClusterConfig) -> Cluster {
    Cluster {
        name: key.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: key.to_string(),
        }),
        connect_timeout: Some(dur(c.policy.connect_timeout)),
        // Peak-EWMA has no Envoy equivalent; round robin is what every xDS client supports.
        lb_policy: match c.policy.lb {
            LbKind::LeastRequest => LbPolicy::LeastRequest,
            LbKind::RoundRobin | LbKind::PeakEWMA => LbPolicy::RoundRobin,
        } as i32,
        typed_extension_protocol_options: match c.protocol {
            Protocol::Http2 | Protocol::Grpc => [(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
                pack_any(HttpProtocolOptions {
                    upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                        ExplicitHttpConfig {
                            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                                Default::default(),
                            )),
                        },
                    )),
                    ..Default::default()
                }),
            )]
            .into(),
            Protocol::Http | Protocol::Tcp => Default::default(),
        },
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn load_assignment(key: &str, endpoints: &[EndpointConfig]) -> ClusterLoadAssignment {
    // Group by locality; a locality's weight is the sum of its endpoints' weights.
    let mut groups: BTreeMap<(String, String, String), Vec<&EndpointConfig>> = BTreeMap::new();
    for e in endpoints {
        let l = &e.locality;
        let k = (
            l.region.clone().unwrap_or_default(),
            l.zone.clone().unwrap_or_default(),
            l.host.clone().unwrap_or_default(),
        );
        groups.entry(k).or_default().push(e);
    }
    let endpoints = groups
        .into_iter()
        .map(|((region, zone, sub_zone), eps)| LocalityLbEndpoints {
            locality: Some(Locality {
                region,
                zone,
                sub_zone,
            }),
            load_balancing_weight: Some(UInt32Value {
                value: eps.iter().map(|e| e.weight).sum::<u32>().max(1),
            }),
            lb_endpoints: eps
                .into_iter()
                .map(|e| {
                    let mut fields = std::collections::HashMap::new();
                    fields.insert("environment".into(), string_value(e.environment.as_str()));
                    fields.insert("workload".into(), string_value(&e.workload.to_string()));
                    let mut filter_metadata = std::collections::HashMap::new();
                    filter_metadata.insert(METADATA_NAMESPACE.to_string(), Struct { fields });
                    LbEndpoint {
                        health_status: HealthStatus::Healthy as i32,
                        load_balancing_weight: Some(UInt32Value { value: e.weight }),
                        metadata: Some(Metadata {
                            filter_metadata,
                            ..Default::default()
                        }),
                        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket(e.addr)),
                            ..Default::default()
                        })),
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: key.to_string(),
        endpoints,
        ..Default::default()
    }
}
