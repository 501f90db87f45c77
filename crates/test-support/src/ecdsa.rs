//! ECDSA signatures as an attacker may rewrite them.

/// `(r, n − s)` of a P-256 signature `(r, s)` in DER: the other signature that verifies.
pub fn malleated(der: &[u8]) -> Vec<u8> {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let rlen = usize::from(der[3]);
    let r = &der[4..4 + rlen];
    let s = &der[4 + rlen + 2..];
    let mut s32 = [0u8; 32];
    let s = s.strip_prefix(&[0]).unwrap_or(s);
    s32[32 - s.len()..].copy_from_slice(s);
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(N[i]) - i16::from(s32[i]) - borrow;
        borrow = i16::from(d < 0);
        out[i] = d.rem_euclid(256) as u8;
    }
    let mut s2: Vec<u8> = out.iter().copied().skip_while(|b| *b == 0).collect();
    if s2[0] & 0x80 != 0 {
        s2.insert(0, 0);
    }
    let mut body = vec![0x02, rlen as u8];
    body.extend_from_slice(r);
    body.extend_from_slice(&[0x02, s2.len() as u8]);
    body.extend_from_slice(&s2);
    let mut sig = vec![0x30, body.len() as u8];
    sig.extend_from_slice(&body);
    sig
}
