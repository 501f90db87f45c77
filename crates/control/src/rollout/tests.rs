use serde_json::json;

use super::*;

fn spec() -> RolloutSpec {
    serde_json::from_value(json!({
        "service": "catalog", "stable": "catalog-v1", "canary": "catalog-v2"
    }))
    .unwrap()
}

#[test]
fn a_route_gets_the_canary_beside_the_stable_backend_and_the_weights_add_up_to_100() {
    let route = json!({
        "kind": "HTTPRoute",
        "spec": {
            "parentRefs": [{ "kind": "Service", "name": "catalog", "port": 80 }],
            "rules": [
                { "matches": [{ "path": { "value": "/admin" } }],
                  "backendRefs": [{ "name": "admin", "port": 80 }] },
                { "backendRefs": [{ "name": "catalog-v1", "port": 80 }],
                  "timeouts": { "request": "5s" } }
            ]
        }
    });
    let five = with_weights(&route, "test", &spec(), 5);
    assert_eq!(
        five["spec"]["rules"][1]["backendRefs"],
        json!([
            { "name": "catalog-v1", "port": 80, "weight": 95 },
            { "name": "catalog-v2", "port": 80, "weight": 5 }
        ])
    );
    // Other rules and fields stay as written.
    assert_eq!(five["spec"]["rules"][0], route["spec"]["rules"][0]);
    assert_eq!(
        five["spec"]["rules"][1]["timeouts"],
        json!({ "request": "5s" })
    );
    // The next step moves the same two; rolled back, the canary keeps a zero weight.
    let half = with_weights(&five, "test", &spec(), 50);
    assert_eq!(half["spec"]["rules"][1]["backendRefs"][0]["weight"], 50);
    assert_eq!(half["spec"]["rules"][1]["backendRefs"][1]["weight"], 50);
    let back = with_weights(&half, "test", &spec(), 0);
    assert_eq!(back["spec"]["rules"][1]["backendRefs"][0]["weight"], 100);
    assert_eq!(back["spec"]["rules"][1]["backendRefs"][1]["weight"], 0);
    assert_eq!(with_weights(&back, "test", &spec(), 0), back);
    // A backend of another namespace with the stable's name is not the stable backend.
    let other = json!({ "spec": { "rules": [
        { "backendRefs": [{ "name": "catalog-v1", "namespace": "prod", "port": 80 }] }
    ] } });
    assert_eq!(with_weights(&other, "test", &spec(), 5), other);
}

#[test]
fn actions_parse() {
    assert_eq!("pause".parse::<Action>().unwrap(), Action::Pause);
    assert_eq!("promote".parse::<Action>().unwrap(), Action::Promote);
    assert!("rollback".parse::<Action>().is_err());
}
