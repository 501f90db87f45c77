//! Unsigned integers in decimal with no `fmt` machinery, two digits a step: the HTTP/1.1
//! encoder's lengths and the access log's numbers, written for every request.

/// `"00" "01" .. "99"`: two digits of a number below 100 at once.
const PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// A number's decimal digits, kept in place (`u64::MAX` has 20).
pub(crate) struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    #[inline]
    pub(crate) fn new(mut n: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            let pair = n as usize * 2;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        } else {
            i -= 1;
            digits[i] = b'0' + n as u8;
        }
        Self { digits, start: i }
    }

    #[inline]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::Decimal;

    fn check(n: u64) {
        assert_eq!(Decimal::new(n).as_bytes(), n.to_string().as_bytes(), "{n}");
    }

    /// Every number at and around each power of ten, the first ten thousand, the largest,
    /// and random ones write what `Display` writes.
    #[test]
    fn digits_are_what_display_writes() {
        (0..10_000).for_each(check);
        let mut p = 1u64;
        while let Some(next) = p.checked_mul(10) {
            (p - 1..=p + 1).for_each(check);
            p = next;
        }
        (p - 1..=p + 1).for_each(check);
        check(u64::MAX);
        check(u64::MAX - 1);
        let mut rng = fastrand::Rng::with_seed(10);
        for _ in 0..100_000 {
            check(rng.u64(..) >> rng.u32(0..64));
        }
    }
}
