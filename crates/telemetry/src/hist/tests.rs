use super::*;

fn exact(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted[rank - 1]
}

fn values(n: usize, lo: f64, span: f64) -> Vec<f64> {
    (0..n)
        .map(|_| lo * span.powf(fastrand::f64()))
        .collect::<Vec<_>>()
}

#[test]
fn quantiles_are_within_the_scales_error() {
    fastrand::seed(7);
    for span in [1.5, 30.0, 1000.0, 1e6] {
        let mut v = values(5000, 0.0001, span);
        let mut h = Histogram::default();
        for &x in &v {
            h.record(x);
        }
        v.sort_by(f64::total_cmp);
        let err = h.relative_error();
        assert!(h.counts().len() <= MAX_BUCKETS);
        for q in [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let (got, want) = (h.quantile(q).unwrap(), exact(&v, q));
            assert!(
                (got - want).abs() <= want * err * 1.0001,
                "span {span} q {q}: {got} vs {want} (error {err}, scale {})",
                h.scale()
            );
        }
        assert_eq!(h.count(), 5000);
    }
}

#[test]
fn the_default_scale_is_about_one_percent() {
    let h = Histogram::default();
    assert!(h.relative_error() < 0.011, "{}", h.relative_error());
    let mut wide = Histogram::default();
    wide.record(0.0001);
    wide.record(100.0);
    assert!(wide.scale() < DEFAULT_SCALE);
    assert!(wide.counts().len() <= MAX_BUCKETS);
}

#[test]
fn merging_equals_recording_everything_in_one() {
    fastrand::seed(11);
    for (a_span, b_span) in [(2.0, 3.0), (10.0, 1e5), (1e6, 1.1)] {
        let a: Vec<f64> = values(700, 0.001, a_span);
        let b: Vec<f64> = values(900, 0.02, b_span);
        let (mut ha, mut hb, mut all) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for &x in &a {
            ha.record(x);
            all.record(x);
        }
        for &x in &b {
            hb.record(x);
            all.record(x);
        }
        ha.merge(&hb);
        // The merged one may sit at a finer scale than `all` only if `all` lowered its scale
        // for a range it saw in a different order; bring both to the coarser to compare.
        let s = ha.scale().min(all.scale());
        ha.downscale(ha.scale() - s);
        all.downscale(all.scale() - s);
        assert_eq!(ha.counts(), all.counts());
        assert_eq!(ha.offset(), all.offset());
        assert_eq!(ha.count(), 1600);
        assert!((ha.sum() - all.sum()).abs() < 1e-9);
        assert_eq!(ha.min(), all.min());
        assert_eq!(ha.max(), all.max());
    }
}

#[test]
fn zeros_and_bad_values_count_in_the_zero_bucket() {
    let mut h = Histogram::default();
    h.record(0.0);
    h.record(-1.0);
    h.record(f64::NAN);
    h.record(0.5);
    assert_eq!(h.zero_count(), 3);
    assert_eq!(h.count(), 4);
    assert_eq!(h.quantile(0.5), Some(0.0));
    let q = h.quantile(1.0).unwrap();
    assert!((q - 0.5).abs() < 0.5 * h.relative_error() * 1.0001);
}

#[test]
fn parts_round_trip_and_nonsense_is_refused() {
    let mut h = Histogram::default();
    for x in [0.001, 0.002, 0.004, 0.0] {
        h.record(x);
    }
    let back = Histogram::from_parts(
        h.scale(),
        h.zero_count(),
        h.offset(),
        h.counts().to_vec(),
        h.sum(),
        h.min().unwrap(),
        h.max().unwrap(),
    )
    .unwrap();
    assert_eq!(back, h);
    assert!(Histogram::from_parts(40, 0, 0, vec![], 0.0, 0.0, 0.0).is_err());
    assert!(Histogram::from_parts(5, 0, 0, vec![1; MAX_BUCKETS + 1], 1.0, 0.1, 0.2).is_err());
    assert!(Histogram::from_parts(5, u64::MAX, 0, vec![1], 1.0, 0.1, 0.2).is_err());
    assert!(Histogram::from_parts(5, 0, 0, vec![1], f64::NAN, 0.1, 0.2).is_err());
    assert!(Histogram::from_parts(5, 0, 0, vec![1], 1.0, 0.3, 0.2).is_err());
    assert!(Histogram::from_parts(5, 0, i32::MAX, vec![1, 1], 1.0, 0.1, 0.2).is_err());
}

#[test]
fn cumulative_buckets_end_at_the_count() {
    let mut h = Histogram::default();
    for x in [0.001, 0.01, 0.1] {
        h.record(x);
    }
    let c: Vec<_> = h.cumulative().collect();
    assert_eq!(c.last().unwrap().1, 3);
    assert!(c.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    // Each value is at or below the bound of the bucket where it is first counted.
    for x in [0.001, 0.01, 0.1] {
        let below = c.iter().find(|(le, _)| *le >= x).unwrap().1;
        let under = c
            .iter()
            .take_while(|(le, _)| *le < x)
            .last()
            .map_or(0, |b| b.1);
        assert!(below > under, "{x}: {c:?}");
    }
}

#[test]
fn counts_over_a_value_agree_with_the_quantiles() {
    fastrand::seed(11);
    for scale in [3, DEFAULT_SCALE] {
        let mut h = Histogram::new(scale);
        let mut v = values(700, 0.0005, 400.0);
        v.extend([0.0, 0.0, 0.2, 0.2, 0.2]);
        for &x in &v {
            h.record(x);
        }
        v.sort_by(f64::total_cmp);
        assert_eq!(h.count_over(h.max().unwrap()), 0);
        assert_eq!(h.count_over(-1.0), h.count());
        for q in [0.01, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let rank = ((q * h.count() as f64).ceil() as u64).max(1);
            let at = h.quantile(q).unwrap();
            // Just under the quantile: at least the values from its rank up are over it.
            assert!(
                h.count_over(at * 0.999_999) > h.count() - rank,
                "scale {scale} q {q}"
            );
            // At it: at most the values above its rank are.
            assert!(h.count_over(at) <= h.count() - rank, "scale {scale} q {q}");
        }
        // Against the exact count, within a bucket's error either way.
        for t in [0.001, 0.01, 0.1, 0.19] {
            let exact = v.iter().filter(|&&x| x > t).count() as u64;
            let (lo, hi) = (
                v.iter().filter(|&&x| x > t * 1.2).count() as u64,
                v.iter().filter(|&&x| x > t / 1.2).count() as u64,
            );
            let got = h.count_over(t);
            assert!(
                lo <= got && got <= hi,
                "scale {scale} t {t}: {got}, exact {exact}"
            );
        }
    }
}
