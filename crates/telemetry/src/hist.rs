//! A latency histogram with exponential buckets, as OpenTelemetry's exponential histogram and
//! Prometheus's native histograms define them: at scale `s`, bucket `i` holds the values in
//! `(base^i, base^(i+1)]` with `base = 2^(2^-s)`. Two histograms merge exactly (the finer one
//! is brought to the coarser scale, which loses nothing of the coarser one), so a proxy's
//! periods, a service's proxies and two control-plane replicas add up to the histogram that
//! would have seen every request.
//!
//! At [`DEFAULT_SCALE`] (5) a quantile is within 1.1 % of the true value. A histogram holds at
//! most [`MAX_BUCKETS`] buckets: values spanning more than 2^(MAX_BUCKETS/32) (1,024×) halve
//! the scale until they fit (2.2 % error for a 10^6× span), so memory is bounded whatever
//! the values.

/// The scale new histograms start at: base 2^(1/32), quantiles within 1.1 %.
pub const DEFAULT_SCALE: i8 = 5;
/// The most buckets a histogram holds; beyond, its scale is lowered.
pub const MAX_BUCKETS: usize = 320;
/// The lowest scale (base 2^16): any two finite values fit.
const MIN_SCALE: i8 = -4;
/// Values at or below this (seconds) count in the zero bucket.
pub const ZERO_THRESHOLD: f64 = 1e-9;

/// An exponential histogram of non-negative values (seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    scale: i8,
    zero: u64,
    /// The index of `counts[0]`.
    offset: i32,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(DEFAULT_SCALE)
    }
}

/// The index of the bucket holding `v` (> 0) at `scale`.
fn index(v: f64, scale: i8) -> i32 {
    // ceil(log2(v) * 2^scale) - 1: the bucket (base^i, base^(i+1)].
    let l = v.log2() * f64::powi(2.0, i32::from(scale));
    (l.ceil() as i32).saturating_sub(1)
}

/// The lower bound of bucket `i` at `scale`.
fn lower(i: i32, scale: i8) -> f64 {
    f64::powf(2.0, f64::from(i) / f64::powi(2.0, i32::from(scale)))
}

impl Histogram {
    /// An empty histogram at `scale`.
    pub fn new(scale: i8) -> Self {
        Self {
            scale,
            zero: 0,
            offset: 0,
            counts: Vec::new(),
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: 0.0,
        }
    }

    /// Rebuild from parts (a report), refusing what no histogram could be.
    pub fn from_parts(
        scale: i8,
        zero: u64,
        offset: i32,
        counts: Vec<u64>,
        sum: f64,
        min: f64,
        max: f64,
    ) -> Result<Self, String> {
        if !(MIN_SCALE..=20).contains(&scale) {
            return Err(format!("scale {scale} is outside {MIN_SCALE}..=20"));
        }
        if counts.len() > MAX_BUCKETS {
            return Err(format!("{} buckets, at most {MAX_BUCKETS}", counts.len()));
        }
        if offset.checked_add(counts.len() as i32).is_none() {
            return Err("bucket offset out of range".into());
        }
        let count = counts
            .iter()
            .try_fold(zero, |a, &c| a.checked_add(c))
            .ok_or("counts overflow")?;
        if !(sum.is_finite() && sum >= 0.0) {
            return Err("sum is not a finite non-negative number".into());
        }
        let (min, max) = if count == 0 {
            (f64::INFINITY, 0.0)
        } else if min.is_finite() && max.is_finite() && 0.0 <= min && min <= max {
            (min, max)
        } else {
            return Err("min and max are not 0 <= min <= max".into());
        };
        let mut h = Self {
            scale,
            zero,
            offset,
            counts,
            count,
            sum,
            min,
            max,
        };
        h.trim();
        Ok(h)
    }

    /// Count `v` seconds.
    pub fn record(&mut self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if v <= ZERO_THRESHOLD {
            self.zero += 1;
            return;
        }
        let mut i = index(v, self.scale);
        if self.counts.is_empty() {
            self.offset = i;
            self.counts.push(1);
            return;
        }
        let (lo, hi) = (self.offset.min(i), (self.top()).max(i));
        let shift = Self::shift_to_fit(lo, hi);
        if shift > 0 {
            self.downscale(shift);
            i >>= shift;
        }
        self.add_at(i, 1);
    }

    /// Add every value of `o`.
    pub fn merge(&mut self, o: &Histogram) {
        if o.count == 0 {
            return;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.zero += o.zero;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if o.counts.is_empty() {
            return;
        }
        let scale = self.scale.min(o.scale);
        let (mut os, mut ss) = (o.scale - scale, self.scale - scale);
        // The range both cover at the common scale, lowered further until it fits.
        let (olo, ohi) = (o.offset >> os, o.top() >> os);
        let (lo, hi) = if self.counts.is_empty() {
            (olo, ohi)
        } else {
            ((self.offset >> ss).min(olo), (self.top() >> ss).max(ohi))
        };
        let extra = Self::shift_to_fit(lo, hi);
        os += extra;
        ss += extra;
        if ss > 0 {
            self.downscale(ss);
        }
        // Make room once, then add bucket by bucket (a window's query merges thousands).
        let (olo, ohi) = (o.offset >> os, o.top() >> os);
        if self.counts.is_empty() {
            self.offset = olo;
            self.counts = vec![0; (ohi - olo) as usize + 1];
        } else {
            if olo < self.offset {
                let grow = (self.offset - olo) as usize;
                self.counts.splice(0..0, std::iter::repeat_n(0, grow));
                self.offset = olo;
            }
            if ohi > self.top() {
                self.counts.resize((ohi - self.offset) as usize + 1, 0);
            }
        }
        let base = self.offset;
        if os == 0 {
            let at = (o.offset - base) as usize;
            for (mine, &c) in self.counts[at..at + o.counts.len()]
                .iter_mut()
                .zip(&o.counts)
            {
                *mine += c;
            }
        } else {
            for (k, &c) in o.counts.iter().enumerate() {
                self.counts[(((o.offset + k as i32) >> os) - base) as usize] += c;
            }
        }
    }

    /// How many scale steps bring buckets `lo..=hi` within [`MAX_BUCKETS`].
    fn shift_to_fit(lo: i32, hi: i32) -> i8 {
        let mut s = 0;
        while i64::from(hi >> s) - i64::from(lo >> s) + 1 > MAX_BUCKETS as i64 {
            s += 1;
        }
        s
    }

    fn top(&self) -> i32 {
        self.offset + self.counts.len() as i32 - 1
    }

    /// Add `c` at bucket `i` (at the current scale), growing the range as needed.
    fn add_at(&mut self, i: i32, c: u64) {
        if self.counts.is_empty() {
            self.offset = i;
            self.counts.push(c);
            return;
        }
        if i < self.offset {
            let grow = (self.offset - i) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = i;
        } else if i > self.top() {
            let n = (i - self.offset) as usize + 1;
            self.counts.resize(n, 0);
        }
        self.counts[(i - self.offset) as usize] += c;
    }

    /// Lower the scale by `by` steps: each step merges pairs of buckets.
    pub fn downscale(&mut self, by: i8) {
        if by <= 0 {
            return;
        }
        let by = by.min(self.scale - MIN_SCALE);
        self.scale -= by;
        if self.counts.is_empty() {
            return;
        }
        let old = std::mem::take(&mut self.counts);
        let first = self.offset;
        self.offset = first >> by;
        let top = (first + old.len() as i32 - 1) >> by;
        self.counts = vec![0; (top - self.offset) as usize + 1];
        for (k, c) in old.into_iter().enumerate() {
            let i = (first + k as i32) >> by;
            self.counts[(i - self.offset) as usize] += c;
        }
    }

    /// Drop empty buckets at either end.
    fn trim(&mut self) {
        let start = self.counts.iter().position(|&c| c > 0);
        match start {
            None => {
                self.counts.clear();
                self.offset = 0;
            }
            Some(s) => {
                let end = self.counts.iter().rposition(|&c| c > 0).unwrap_or(s);
                self.counts.truncate(end + 1);
                self.counts.drain(..s);
                self.offset += s as i32;
            }
        }
    }

    /// The value at quantile `q` (0..=1): the geometric middle of the bucket that holds the
    /// rank, clamped to the least and greatest value seen. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        // The rank of the value wanted, 1-based (the nearest-rank definition).
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        if rank <= self.zero {
            return Some(0.0);
        }
        let mut seen = self.zero;
        for (k, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let i = self.offset + k as i32;
                let mid = (lower(i, self.scale) * lower(i + 1, self.scale)).sqrt();
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// How many values are over `v`, each taken as [`Self::quantile`] reports it (its
    /// bucket's geometric middle, clamped to the least and greatest value seen): so
    /// `quantile(q) > v` exactly when more than `count - rank(q)` values are.
    pub fn count_over(&self, v: f64) -> u64 {
        if self.count == 0 || self.max <= v {
            return 0;
        }
        let mut over = if v < 0.0 { self.zero } else { 0 };
        for (k, &c) in self.counts.iter().enumerate().rev() {
            let i = self.offset + k as i32;
            let mid = (lower(i, self.scale) * lower(i + 1, self.scale)).sqrt();
            if mid.clamp(self.min, self.max) <= v {
                break;
            }
            over += c;
        }
        over
    }

    /// How many values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their sum.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// The least value (`None` when empty).
    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    /// The greatest value (`None` when empty).
    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    /// The scale.
    pub fn scale(&self) -> i8 {
        self.scale
    }

    /// Values in the zero bucket.
    pub fn zero_count(&self) -> u64 {
        self.zero
    }

    /// The index of the first bucket in [`Self::counts`].
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// The buckets' counts from [`Self::offset`].
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The buckets as `(upper bound, cumulative count)` (Prometheus's classic `le` buckets),
    /// the zero bucket first.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let zero = std::iter::once((ZERO_THRESHOLD, self.zero));
        let mut seen = self.zero;
        zero.chain(self.counts.iter().enumerate().map(move |(k, &c)| {
            seen += c;
            (lower(self.offset + k as i32 + 1, self.scale), seen)
        }))
    }

    /// The relative error of a quantile at this scale: half a bucket, geometrically.
    pub fn relative_error(&self) -> f64 {
        lower(1, self.scale).sqrt() - 1.0
    }

    /// Bytes held on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.counts.capacity() * 8
    }

    /// Release spare capacity (for long-lived copies).
    pub fn shrink(&mut self) {
        self.counts.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests;
