use super::*;

/// Heads that differ from well-formed ones in the places httparse is strict or lenient
/// about: blank lines first, bare LF, tabs, spaces before a colon, folded lines, control
/// bytes, DEL, obs-text, non-UTF-8 targets, short versions, codes and reasons, and heads cut
/// at every byte.
#[test]
fn agrees_with_httparse_on_chosen_heads() {
    let heads: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\r\n\nGET / HTTP/1.1\nHost: a\n\n",
        b"POST /x?y HTTP/1.0\r\nContent-Length: 3\r\nX:\r\nY: \t \r\nZ: a b \t\r\n\r\nabc",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x7fb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\tb\xff\x80\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",
        b"GET /\xc3 HTTP/1.1\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.2\r\n\r\n",
        b"GET / HTTP/2\r\n\r\n",
        b"G@T / HTTP/1.1\r\n\r\n",
        b" GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: 0123456789abcdef0123456789abcdef\x01\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: 0123456789abcdef0123456789abcdef\t0123456\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: 0123456789abcdef0123\x7f456789abcdef\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\r",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200\r\n\r\n",
        b"HTTP/1.1 200\n\n",
        b"HTTP/1.0 404 Not \tFound\xff\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x01K\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 07 Dec 2026 18:00:00 GMT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\r\n",
        b"HTTX/1.1 200 OK\r\n\r\n",
    ];
    for head in heads {
        for slots in [0, 1, 3, 100] {
            for cut in 0..=head.len() {
                check_against_httparse(&head[..cut], slots);
            }
        }
    }
}

/// Pieces joined at random (a fixed seed: the same run every time): most are malformed in
/// some way, many are well-formed or cut short.
#[test]
fn agrees_with_httparse_on_generated_heads() {
    const PIECES: &[&[u8]] = &[
        b"GET",
        b"POST",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/1.",
        b" ",
        b"  ",
        b"\r\n",
        b"\n",
        b"\r",
        b"\t",
        b":",
        b": ",
        b"/",
        b"/a?b=c",
        b"Host",
        b"content-length",
        b"x-y",
        b"200",
        b"404 Not Found",
        b"0123456789abcdef",
        b"value with spaces",
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x80",
        b"\xc3\xa9",
        b"\xff",
        b"\"",
        b"(",
        b"@",
        b"a",
        b"\r\n\r\n",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut buf = Vec::new();
    for _ in 0..60_000 {
        buf.clear();
        // Half start from a well-formed first line, so that the fields are reached.
        match next() % 4 {
            0 => buf.extend_from_slice(b"GET / HTTP/1.1\r\n"),
            1 => buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n"),
            _ => {}
        }
        for _ in 0..(next() % 24) {
            buf.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
        }
        if next() % 3 == 0 {
            buf.extend_from_slice(b"\r\n\r\n");
        }
        let slots = [0, 2, 100][(next() % 3) as usize];
        check_against_httparse(&buf, slots);
    }
}

/// A value scanned eight bytes a step stops where one scanned byte by byte does, whatever
/// byte ends it and wherever it stands.
#[test]
fn a_value_ends_at_its_first_byte_outside_the_value_set() {
    for len in 0..40 {
        for stop in [0x00u8, 0x01, 0x0a, 0x0d, 0x1f, 0x7f] {
            for at in 0..=len {
                let mut v: Vec<u8> = (0..len).map(|i| b"az \t~\x80\xff!"[i % 8]).collect();
                if at < len {
                    v[at] = stop;
                }
                let want = v
                    .iter()
                    .position(|&b| !VALUE[b as usize])
                    .unwrap_or(v.len());
                assert_eq!(value_end(&v, 0), want, "{v:?}");
            }
        }
    }
}
