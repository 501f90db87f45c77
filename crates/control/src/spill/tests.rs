use std::time::{Duration, Instant};

use trellis_model::{parse_documents, translate};

use super::*;

/// `test/catalog` on three VMs and two containers; spill-over vm → container.
fn mesh(extra: &str) -> ProxyConfig {
    let mut docs = vec![
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]\n".to_string(),
        format!("apiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{ name: catalog, namespace: test }}\nspec:\n  targetRefs: [{{ kind: Service, name: catalog }}]\n  spillover:\n    pools: [{{ environment: vm }}, {{ environment: container }}]\n{extra}"),
    ];
    for (name, env) in [
        ("vm-1", "vm"),
        ("vm-2", "vm"),
        ("vm-3", "vm"),
        ("ct-1", "container"),
        ("ct-2", "container"),
    ] {
        docs.push(format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: catalog }} }}\nspec: {{ address: 127.0.0.1, environment: {env}, ports: {{ http: 1 }} }}\n"));
    }
    let res = parse_documents("t.yaml", &docs.join("---\n")).unwrap();
    translate("t.yaml", &res, None).unwrap()
}

/// A fleet whose VMs each have `vm` in flight of a limit of 20 (and shed `shed`), and whose
/// containers each have 2 of 100.
fn hear(s: &Spill, vm: f64, shed: u64, now: Instant) {
    hear_both(s, (vm, shed), (2.0, 0), now);
}

/// As [`hear`], the containers (limit 100) with `ct` in flight and shedding.
fn hear_both(s: &Spill, vm: (f64, u64), ct: (f64, u64), now: Instant) {
    let (vm, shed) = vm;
    for w in ["vm-1", "vm-2", "vm-3"] {
        s.beacon(
            &Beacon {
                workload: format!("test/{w}"),
                limit: 20,
                in_flight_milli: (vm * 1000.0) as u64,
                shed,
                answered: 100,
            },
            now,
        );
    }
    for w in ["ct-1", "ct-2"] {
        s.beacon(
            &Beacon {
                workload: format!("test/{w}"),
                limit: 100,
                in_flight_milli: (ct.0 * 1000.0) as u64,
                shed: ct.1,
                answered: 100,
            },
            now,
        );
    }
}

fn vm_share(s: &Spill) -> f64 {
    s.states()[0].pools[0].spilled_percent
}

/// Run `secs` seconds of ticks with the VMs at `vm` in flight each; the VM pool's share
/// after each second.
fn run(s: &Spill, m: &ProxyConfig, t: &mut Instant, secs: u32, vm: f64, shed: u64) -> Vec<f64> {
    (0..secs)
        .map(|_| {
            *t += Duration::from_secs(1);
            hear(s, vm, shed, *t);
            s.tick(m, *t);
            vm_share(s)
        })
        .collect()
}

#[test]
fn an_overloaded_pool_spills_after_the_hold_and_takes_its_traffic_back_when_light() {
    let (s, m, mut t) = (Spill::default(), mesh(""), Instant::now());
    // Light: nothing moves.
    assert!(run(&s, &m, &mut t, 10, 4.0, 0).iter().all(|&x| x == 0.0));
    // Overloaded (19 of 20 in flight: 95 % ≥ 80 %): once it has been for the 3 s hold, up
    // 10 % a second.
    let up = run(&s, &m, &mut t, 9, 19.0, 0);
    assert_eq!(
        up,
        [0.0, 0.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0],
        "{up:?}"
    );
    let st = &s.states()[0];
    assert_eq!(st.pools[0].to.as_deref(), Some("container"));
    assert!(st.pools[0].since_ms.is_some());
    assert_eq!(st.history.last().unwrap().what, "started");
    assert_eq!(
        st.lines(|_| "14:02".into()),
        ["test/catalog: 60 % spilled vm → container since 14:02"]
    );
    // The proxies are told.
    let a = s.beacon(&Beacon::default(), t);
    assert_eq!(a.every_ms, 1000);
    assert_eq!(a.spill[0].service, "test/catalog");
    assert_eq!(a.spill[0].permille[0], 600);
    // Inside the band (60 %): held where it is.
    assert!(run(&s, &m, &mut t, 20, 12.0, 0).iter().all(|&x| x == 60.0));
    // Light (25 %): after the hold, back by 5 % a second, to nothing within 30 s.
    let down = run(&s, &m, &mut t, 30, 5.0, 0);
    assert_eq!(down[..5], [60.0, 60.0, 60.0, 55.0, 50.0], "{down:?}");
    assert_eq!(*down.last().unwrap(), 0.0, "{down:?}");
    let st = &s.states()[0];
    assert_eq!(st.pools[0].since_ms, None);
    assert_eq!(st.history.last().unwrap().what, "ended");
    assert!(s.beacon(&Beacon::default(), t).spill.is_empty());
}

#[test]
fn shedding_counts_as_overload_and_short_spikes_move_nothing() {
    let (s, m, mut t) = (Spill::default(), mesh("    hold: 5s\n"), Instant::now());
    // Spikes of 2 s in 4, shorter than the 5 s hold: never moves.
    for _ in 0..5 {
        run(&s, &m, &mut t, 2, 20.0, 0);
        run(&s, &m, &mut t, 2, 5.0, 0);
    }
    assert_eq!(vm_share(&s), 0.0);
    // Half in flight, but shedding: overloaded.
    let up = run(&s, &m, &mut t, 7, 10.0, 3);
    assert_eq!(up[up.len() - 1], 20.0, "{up:?}");
}

#[test]
fn a_pool_shedding_much_of_its_traffic_spills_in_proportion() {
    // Each VM sheds 300 and answers 100 a second: 3/4 of what reaches the pool is too much.
    // After the hold, half of that at once (37.5 %), then half of 3/4 of what is left.
    let (s, m, mut t) = (Spill::default(), mesh(""), Instant::now());
    let up = run(&s, &m, &mut t, 5, 20.0, 300);
    assert_eq!(up, [0.0, 0.0, 0.0, 37.5, 60.9], "{up:?}");
}

#[test]
fn a_load_swinging_across_the_band_does_not_flap() {
    // The load swings each second between just below the high mark and just above the low
    // one (as a pool near its balance does): the share rises once and holds.
    let (s, m, mut t) = (Spill::default(), mesh(""), Instant::now());
    run(&s, &m, &mut t, 5, 19.0, 0);
    let settled = vm_share(&s);
    assert!(settled > 0.0);
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen.extend(run(&s, &m, &mut t, 1, 15.0, 0));
        seen.extend(run(&s, &m, &mut t, 1, 11.0, 0));
    }
    assert!(seen.iter().all(|&x| x == settled), "{seen:?}");
}

#[test]
fn nothing_spills_without_a_pool_to_take_it_or_without_loads_heard() {
    // A preference naming only pools without endpoints past the first: nowhere to go.
    let (s, m, mut t) = (
        Spill::default(),
        mesh("    highLoad: 50\n    lowLoad: 10\n").clone(),
        Instant::now(),
    );
    let m2 = {
        let mut m2 = m.clone();
        for c in m2.clusters.values_mut() {
            let c = std::sync::Arc::make_mut(c);
            c.endpoints.retain(|e| e.environment.as_str() == "vm");
        }
        m2
    };
    assert!(run(&s, &m2, &mut t, 10, 19.0, 0).iter().all(|&x| x == 0.0));
    // Nothing heard for longer than 3 s: the share holds, neither rises nor falls.
    let (s, mut t) = (Spill::default(), Instant::now());
    run(&s, &m, &mut t, 6, 19.0, 0);
    let mut quiet = || {
        t += Duration::from_secs(1);
        s.tick(&m, t);
        vm_share(&s)
    };
    // (What was heard counts for 3 s more.)
    let held = (0..4).map(|_| quiet()).last().unwrap();
    assert!(held > 0.0);
    assert!((0..10).all(|_| quiet() == held));
    assert_eq!(s.states()[0].pools[0].load_percent, None);
    // Heard again, still overloaded: the hold it had stands, the share rises at once.
    run(&s, &m, &mut t, 1, 19.0, 0);
    assert!(vm_share(&s) > held);
}

#[test]
fn a_policy_removed_or_changed_starts_over() {
    let (s, m, mut t) = (Spill::default(), mesh(""), Instant::now());
    run(&s, &m, &mut t, 6, 19.0, 0);
    assert!(vm_share(&s) > 0.0);
    s.tick(&mesh("    highLoad: 90\n"), t);
    assert_eq!(vm_share(&s), 0.0);
    let plain = {
        let mut p = m.clone();
        for c in p.clusters.values_mut() {
            std::sync::Arc::make_mut(c).policy.spillover = None;
        }
        p
    };
    s.tick(&plain, t);
    assert!(s.states().is_empty());
    assert_eq!(s.beacon(&Beacon::default(), t).every_ms, 10_000);
}

#[test]
fn when_the_next_pool_is_overloaded_too_the_shares_even_out_what_both_shed() {
    let (s, m, mut t) = (Spill::default(), mesh(""), Instant::now());
    let mut tick = |vm: (f64, u64), ct: (f64, u64)| {
        t += Duration::from_secs(1);
        hear_both(&s, vm, ct, t);
        s.tick(&m, t);
        vm_share(&s)
    };
    // The VMs overloaded, the containers not: up.
    let shares: Vec<f64> = (0..5).map(|_| tick((20.0, 100), (20.0, 0))).collect();
    assert!(shares[4] > 0.0, "{shares:?}");
    // Both overloaded, the VMs shedding half of what they get, the containers a tenth: once
    // the containers have been overloaded for the hold, up by 5 % a second only.
    let shares: Vec<f64> = (0..6).map(|_| tick((20.0, 100), (100.0, 11))).collect();
    let steps: Vec<f64> = shares
        .windows(2)
        .map(|w| ((w[1] - w[0]) * 10.0).round() / 10.0)
        .collect();
    assert_eq!(steps[2..], [5.0, 5.0, 5.0], "{shares:?}");
    // Now the containers shed more: back by 5 % a second.
    let top = shares[5];
    let shares: Vec<f64> = (0..3).map(|_| tick((20.0, 11), (100.0, 100))).collect();
    assert_eq!(shares[2], top - 15.0, "{shares:?}");
    // The VMs within their band, the containers overloaded: back too.
    let shares: Vec<f64> = (0..4).map(|_| tick((12.0, 0), (100.0, 100))).collect();
    assert_eq!(shares[3], top - 35.0, "{shares:?}");
}

#[test]
fn replicas_pass_on_only_what_they_heard_and_each_decides_from_all_of_it() {
    // The VMs' proxies are connected to replica A, the caller to B.
    let (a, b, m, mut t) = (Spill::default(), Spill::default(), mesh(""), Instant::now());
    let mut b_shares = Vec::new();
    for _ in 0..6 {
        t += Duration::from_secs(1);
        hear(&a, 19.0, 5, t);
        let from_a = a.own(t);
        assert_eq!(from_a.len(), 5, "{from_a:?}");
        b.merge(&from_a, t);
        // What B took from A, B does not pass on (A would take its own beacons back).
        assert!(b.own(t).is_empty());
        a.tick(&m, t);
        b.tick(&m, t);
        b_shares.push(vm_share(&b));
    }
    assert!(b_shares[5] > 0.0, "B spills from A's loads: {b_shares:?}");
    assert_eq!(
        vm_share(&a),
        vm_share(&b),
        "the same loads, the same shares"
    );
    // A beacon B heard itself later than A's is not replaced by A's older one.
    t += Duration::from_millis(500);
    let light = Beacon {
        workload: "test/vm-1".into(),
        limit: 20,
        in_flight_milli: 1000,
        ..Default::default()
    };
    b.beacon(&light, t);
    let mut old = a.own(t);
    old.iter_mut().for_each(|h| h.age_ms = 400);
    b.merge(&old, t);
    let mine = b.own(t);
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].beacon, light);
    // Stale ones are not taken at all.
    let c = Spill::default();
    let mut stale = a.own(t);
    stale.iter_mut().for_each(|h| h.age_ms = 5000);
    c.merge(&stale, t);
    c.tick(&m, t);
    assert_eq!(c.states()[0].pools[0].workloads, 0);
}

/// A compiled state of `docs` (YAML), as the control plane follows it.
fn compiled(docs: &str) -> crate::catalog::Compiled {
    let events = trellis_model::parse_values("t.yaml", docs)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .map(|doc| {
            let m = &doc["metadata"];
            let key = trellis_store::Key::new(
                doc["kind"].as_str().unwrap(),
                m["namespace"].as_str().unwrap(),
                m["name"].as_str().unwrap(),
            );
            trellis_store::Event::Put(trellis_store::Object {
                key,
                version: 1,
                doc,
            })
        })
        .collect();
    let mut c = crate::catalog::Catalog::default();
    assert!(c.apply(trellis_store::Change {
        revision: 1,
        events,
    }));
    c.compile()
}

/// A mesh without spill-over policies is never translated whole for the tick (it was, after
/// every change: tens of milliseconds at 10,000 workloads); one with a policy is, and ticks.
#[test]
fn the_mesh_is_translated_for_a_tick_only_when_something_spills() {
    let service = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: vm-1, namespace: test, labels: { app: catalog } }\nspec: { address: 127.0.0.1, environment: vm }\n";
    let plain = compiled(&format!("{service}---\napiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{ name: catalog, namespace: test }}\nspec:\n  targetRefs: [{{ kind: Service, name: catalog }}]\n  loadBalancer: {{ type: RoundRobin }}\n"));
    let s = Spill::default();
    let now = Instant::now();
    tick_with(&s, &plain, now);
    assert!(!plain.mesh_made());
    assert!(s.states().is_empty());
    let spilling = compiled(&format!("{service}---\napiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{ name: catalog, namespace: test }}\nspec:\n  targetRefs: [{{ kind: Service, name: catalog }}]\n  spillover:\n    pools: [{{ environment: vm }}, {{ environment: container }}]\n"));
    tick_with(&s, &spilling, now);
    assert!(spilling.mesh_made());
    assert_eq!(s.states().len(), 1, "the service with a policy is followed");
    // The policy removed: its state goes.
    tick_with(&s, &plain, now);
    assert!(s.states().is_empty());
}
