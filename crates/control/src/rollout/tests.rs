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
    let five = with_weights(&route, "test", &spec(), at(5));
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
    let half = with_weights(&five, "test", &spec(), at(50));
    assert_eq!(half["spec"]["rules"][1]["backendRefs"][0]["weight"], 50);
    assert_eq!(half["spec"]["rules"][1]["backendRefs"][1]["weight"], 50);
    let back = with_weights(&half, "test", &spec(), at(0));
    assert_eq!(back["spec"]["rules"][1]["backendRefs"][0]["weight"], 100);
    assert_eq!(back["spec"]["rules"][1]["backendRefs"][1]["weight"], 0);
    assert_eq!(with_weights(&back, "test", &spec(), at(0)), back);
    // A backend of another namespace with the stable's name is not the stable backend.
    let other = json!({ "spec": { "rules": [
        { "backendRefs": [{ "name": "catalog-v1", "namespace": "prod", "port": 80 }] }
    ] } });
    assert_eq!(with_weights(&other, "test", &spec(), at(5)), other);
}

#[test]
fn in_a_rule_with_another_backend_the_canary_takes_the_stables_share_and_the_other_keeps_its_own() {
    // Half to a legacy backend, half to the stable one (weights absent: 1 each).
    let route = json!({
        "kind": "HTTPRoute",
        "spec": { "rules": [
            { "backendRefs": [{ "name": "legacy", "port": 80 }, { "name": "catalog-v1", "port": 80 }] }
        ] }
    });
    let share = |doc: &Value| {
        let bs = doc["spec"]["rules"][0]["backendRefs"]
            .as_array()
            .unwrap()
            .clone();
        let total: u64 = bs.iter().map(weight_of).sum();
        bs.iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    weight_of(b) as f64 / total as f64,
                )
            })
            .collect::<Vec<_>>()
    };
    let five = with_weights(&route, "test", &spec(), at(5));
    // Every weight × 100, so that 5 % of the stable's is a whole weight.
    assert_eq!(
        five["spec"]["rules"][0]["backendRefs"],
        json!([
            { "name": "legacy", "port": 80, "weight": 100 },
            { "name": "catalog-v1", "port": 80, "weight": 95 },
            { "name": "catalog-v2", "port": 80, "weight": 5 }
        ])
    );
    assert_eq!(
        share(&five),
        [
            ("legacy".into(), 0.5),
            ("catalog-v1".into(), 0.475),
            ("catalog-v2".into(), 0.025)
        ]
    );
    // Each step, the rollback and the promotion leave the legacy backend its half.
    for w in [25, 50, 0, 100] {
        let d = with_weights(&five, "test", &spec(), at(w));
        let s = share(&d);
        assert_eq!(s[0], ("legacy".into(), 0.5), "{w}: {d}");
        assert_eq!(s[2].1, 0.5 * f64::from(w) / 100.0, "{w}: {d}");
        // The same step again writes nothing new.
        assert_eq!(with_weights(&d, "test", &spec(), at(w)), d);
    }
    // The share the judge divides: half of the rule's requests.
    let key = Key::new("HTTPRoute", "test", "catalog");
    let id = NamespacedName {
        namespace: "test".into(),
        name: "catalog".into(),
    };
    let rules = weighted_rules(&[(key, five)], &id, &spec());
    assert_eq!(rules.values().copied().collect::<Vec<_>>(), [0.5]);
    // Weights too large to scale are rounded instead.
    let big = json!({ "spec": { "rules": [
        { "backendRefs": [{ "name": "legacy", "port": 80, "weight": 30000 },
                          { "name": "catalog-v1", "port": 80, "weight": 10001 }] }
    ] } });
    let d = with_weights(&big, "test", &spec(), at(5));
    assert_eq!(
        d["spec"]["rules"][0]["backendRefs"],
        json!([
            { "name": "legacy", "port": 80, "weight": 30000 },
            { "name": "catalog-v1", "port": 80, "weight": 9501 },
            { "name": "catalog-v2", "port": 80, "weight": 500 }
        ])
    );
}

/// The canary at `weight` %, no copies.
fn at(weight: u32) -> Routing {
    Routing {
        weight,
        mirror: None,
    }
}

#[test]
fn the_dark_stage_copies_to_the_canary_and_its_end_removes_only_its_own_mirror() {
    let route = json!({
        "kind": "HTTPRoute",
        "spec": { "rules": [
            { "backendRefs": [{ "name": "catalog-v1", "port": 8080 }],
              "filters": [{ "type": "RequestMirror",
                            "requestMirror": { "backendRef": { "name": "shadow", "port": 80 }, "percent": 5 } }] }
        ] }
    });
    let dark = Routing {
        weight: 0,
        mirror: Some(30),
    };
    let d = with_weights(&route, "test", &spec(), dark);
    let rule = &d["spec"]["rules"][0];
    assert_eq!(
        rule["backendRefs"],
        json!([
            { "name": "catalog-v1", "port": 8080, "weight": 100 },
            { "name": "catalog-v2", "port": 8080, "weight": 0 }
        ])
    );
    assert_eq!(
        rule["filters"],
        json!([
            route["spec"]["rules"][0]["filters"][0],
            { "type": "RequestMirror",
              "requestMirror": { "backendRef": { "name": "catalog-v2", "port": 8080 }, "percent": 30 } }
        ])
    );
    // The same stage again changes nothing (the rollout writes only what differs).
    assert_eq!(with_weights(&d, "test", &spec(), dark), d);
    // Out of the dark: the first step's weight, the copies gone, the route's own mirror kept.
    let first = with_weights(&d, "test", &spec(), at(5));
    let rule = &first["spec"]["rules"][0];
    assert_eq!(rule["backendRefs"][1]["weight"], 5);
    assert_eq!(rule["filters"], route["spec"]["rules"][0]["filters"]);
    // A rule whose only filter was the rollout's loses its `filters` with it.
    let bare =
        json!({ "spec": { "rules": [{ "backendRefs": [{ "name": "catalog-v1", "port": 80 }] }] } });
    let d = with_weights(&bare, "test", &spec(), dark);
    let back = with_weights(&d, "test", &spec(), at(0));
    assert!(back["spec"]["rules"][0].get("filters").is_none(), "{back}");
}

#[test]
fn a_deleted_rollout_takes_its_copies_away_and_leaves_the_weights() {
    let route = json!({
        "kind": "HTTPRoute",
        "spec": { "rules": [
            { "backendRefs": [{ "name": "catalog-v1", "port": 8080 }],
              "filters": [{ "type": "RequestMirror",
                            "requestMirror": { "backendRef": { "name": "shadow", "port": 80 }, "percent": 5 } }] },
            { "backendRefs": [{ "name": "admin", "port": 80 }],
              "filters": [{ "type": "RequestMirror",
                            "requestMirror": { "backendRef": { "name": "catalog-v2", "port": 80 }, "percent": 7 } }] }
        ] }
    });
    let dark = Routing {
        weight: 0,
        mirror: Some(30),
    };
    let d = with_weights(&route, "test", &spec(), dark);
    let left = without_mirror(&d, "test", &spec());
    // The rollout's own copies go; the weights it wrote stay; the route's own mirror and a
    // rule it does not weigh (a mirror to the canary's name there is the operator's) stay.
    assert_eq!(
        left["spec"]["rules"][0]["filters"],
        route["spec"]["rules"][0]["filters"]
    );
    assert_eq!(
        left["spec"]["rules"][0]["backendRefs"],
        d["spec"]["rules"][0]["backendRefs"]
    );
    assert_eq!(left["spec"]["rules"][1], route["spec"]["rules"][1]);
    // Nothing to take away: the same route (nothing is written).
    assert_eq!(without_mirror(&left, "test", &spec()), left);
}

#[test]
fn the_dark_stages_last_analysis_is_not_shown_as_the_first_steps() {
    let progress = |dark: bool, phase: Phase| Progress {
        spec: Value::Null,
        phase,
        step: 0,
        weight: if dark { 0 } else { 10 },
        dark,
        step_started_ms: 0,
        reason: String::new(),
        history: Vec::new(),
    };
    let of_dark = Analysis {
        at_ms: 0,
        step: 0,
        dark: true,
        verdict: Verdict::Pass,
        message: String::new(),
        canary: Side::default(),
        stable: Side::default(),
        before_start: false,
    };
    assert!(of_dark.judges(&progress(true, Phase::Progressing)));
    // The dark stage passed: the first step is step 0 too, but not what was judged.
    assert!(!of_dark.judges(&progress(false, Phase::Progressing)));
    assert!(!of_dark.judges(&progress(true, Phase::Paused)));
    let of_first = Analysis {
        dark: false,
        ..of_dark
    };
    assert!(of_first.judges(&progress(false, Phase::Progressing)));
    // Why a rollout waits to start judges no step of it once it has started.
    let waited = Analysis {
        before_start: true,
        ..of_first
    };
    assert!(!waited.judges(&progress(false, Phase::Progressing)));
}

#[test]
fn actions_parse() {
    assert_eq!("pause".parse::<Action>().unwrap(), Action::Pause);
    assert_eq!("promote".parse::<Action>().unwrap(), Action::Promote);
    assert!("rollback".parse::<Action>().is_err());
}
