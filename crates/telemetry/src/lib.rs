//! Fleet telemetry, shared by the proxy (which records and reports), the control plane
//! (which keeps and answers) and the CLI (which shows):
//!
//! - [`hist`]: the latency histogram, exponential buckets that merge exactly;
//! - [`report`]: the protobuf messages a proxy pushes every period;
//! - [`key`] and [`store`]: the control plane's series and their ring buffers, bounded;
//! - [`load`]: the load exchange behind spill-over, and its state as shown;
//! - [`shard`]: a replica's part of a window, merged by the replica that answers;
//! - [`diagnose`]: verdicts joined from both ends of each hop;
//! - [`view`]: the rows of `trellis stat` and `trellis edges`.

pub mod diagnose;
pub mod export;
pub mod fx;
pub mod hist;
pub mod key;
pub mod load;
pub mod report;
pub mod shard;
pub mod store;
pub mod view;

/// Now, in Unix milliseconds (0 on a clock before 1970): the time every report, verdict and
/// view is stamped with.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
