//! Stage `fault`: a route's injected faults (`trellis.dev/Fault`), rolled for each try inside
//! the retry loop ([`super::attempt`]), so that timeouts and retries meet them as they would
//! meet the real thing (Istio turns retries off wherever a fault is injected). In order, each
//! fault of the list is rolled on its own: the delays that come up add up, and the first
//! abort that comes up answers the try without sending it, with class `injected`. Cost on a
//! route without faults: one emptiness check per try.

use std::time::Duration;

use trellis_model::proxy::FaultConfig;

/// What comes up for one try.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rolled {
    /// Hold the try this long first.
    pub(crate) delay: Duration,
    /// Then answer it with this (HTTP status, gRPC status) instead of sending it.
    pub(crate) abort: Option<(u16, u32)>,
}

/// Roll `faults` for one try, with `draw` giving numbers below a million.
pub(crate) fn roll(faults: &[FaultConfig], mut draw: impl FnMut() -> u32) -> Option<Rolled> {
    let mut r = Rolled::default();
    let mut any = false;
    for f in faults {
        match *f {
            FaultConfig::Delay {
                per_million,
                duration,
            } if draw() < per_million => {
                r.delay += duration;
                any = true;
            }
            FaultConfig::Abort {
                per_million,
                status,
                grpc_status,
            } if draw() < per_million => {
                r.abort = Some((status, grpc_status));
                return Some(r);
            }
            _ => {}
        }
    }
    any.then_some(r)
}

/// A number below a million, for [`roll`].
pub(crate) fn draw() -> u32 {
    fastrand::u32(..1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delay(pct: u32, ms: u64) -> FaultConfig {
        FaultConfig::Delay {
            per_million: pct * 10_000,
            duration: Duration::from_millis(ms),
        }
    }

    fn abort(pct: u32, status: u16) -> FaultConfig {
        FaultConfig::Abort {
            per_million: pct * 10_000,
            status,
            grpc_status: 14,
        }
    }

    #[test]
    fn each_fault_is_rolled_in_order_and_the_first_abort_ends_the_list() {
        let faults = [
            delay(100, 50),
            delay(100, 20),
            abort(100, 503),
            abort(100, 500),
        ];
        let r = roll(&faults, draw).unwrap();
        assert_eq!(r.delay, Duration::from_millis(70));
        assert_eq!(r.abort, Some((503, 14)));
        assert_eq!(roll(&[delay(0, 50), abort(0, 503)], draw), None);
        assert_eq!(roll(&[], draw), None);
    }

    #[test]
    fn percentages_hold_over_many_tries() {
        let faults = [delay(30, 1), abort(10, 503)];
        let (mut delayed, mut aborted) = (0, 0);
        let n = 100_000;
        for _ in 0..n {
            if let Some(r) = roll(&faults, draw) {
                delayed += u32::from(!r.delay.is_zero());
                aborted += u32::from(r.abort.is_some());
            }
        }
        // Within about six standard deviations (0.46 % and 0.3 % of n).
        assert!((29_000..31_000).contains(&delayed), "{delayed}");
        assert!((9_000..11_000).contains(&aborted), "{aborted}");
    }
}
