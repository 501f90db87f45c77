use tokio::io::{duplex, AsyncWriteExt};

use super::*;

#[tokio::test]
async fn a_hello_and_each_answer_read_back_as_written() {
    let (mut a, mut b) = duplex(4096);
    let peer = HeaderValue::from_static("db.shop,shop/cart-1,vm,eu/a");
    let trace = crate::trace::ConnTrace::start(0.5).ctx;
    let hello = Hello {
        peer: Some(peer),
        trace: Some(trace),
    };
    write_hello(&mut a, &hello).await.unwrap();
    assert_eq!(read_hello(&mut b).await.unwrap(), hello);
    // A caller with nothing to say (no local workload) says so in an empty frame.
    write_hello(&mut a, &Hello::default()).await.unwrap();
    assert_eq!(read_hello(&mut b).await.unwrap(), Hello::default());

    write_answer(&mut b, None).await.unwrap();
    assert_eq!(read_answer(&mut a).await.unwrap(), Answer::Connected);
    let refused = Error::new(Kind::Denied, "denied by\nshop/sealed");
    write_answer(&mut b, Some(&refused)).await.unwrap();
    assert_eq!(
        read_answer(&mut a).await.unwrap(),
        Answer::Refused {
            class: FailureClass::Denied,
            // A line break in a detail cannot end its line.
            detail: "denied by shop/sealed".into(),
        }
    );
}

#[tokio::test]
async fn names_not_known_are_skipped() {
    let (mut a, mut b) = duplex(4096);
    let body = b"trace=00-ab\nclass=connect_refused\nwhy=later\ndetail=connect to 10.0.0.5:5432\n";
    a.write_all(&(body.len() as u16).to_be_bytes())
        .await
        .unwrap();
    a.write_all(body).await.unwrap();
    assert_eq!(
        read_answer(&mut b).await.unwrap(),
        Answer::Refused {
            class: FailureClass::ConnectRefused,
            detail: "connect to 10.0.0.5:5432".into()
        }
    );
}

/// Bytes written raw, then what the reader made of them.
async fn hello_of(raw: &[u8], close: bool) -> Result<Hello, Error> {
    let (mut a, mut b) = duplex(8192);
    a.write_all(raw).await.unwrap();
    if close {
        drop(a);
        read_hello(&mut b).await
    } else {
        let r = read_hello(&mut b).await;
        drop(a);
        r
    }
}

#[tokio::test]
async fn a_bad_hello_is_the_callers_fault_and_says_what_was_wrong() {
    let long = {
        let mut v = ((MAX_FRAME + 1) as u16).to_be_bytes().to_vec();
        v.resize(2 + MAX_FRAME + 1, b'a');
        v
    };
    let cases: [(&[u8], &str); 4] = [
        (&long, "a frame of 2049 bytes"),
        (b"\x00\x10peer=a", "closed before the frame ended"),
        (b"\x00\x05hello", "a line without '='"),
        (b"\x00\x06peer=\x01", "not a header value"),
    ];
    for (raw, why) in cases {
        let e = hello_of(raw, true).await.unwrap_err();
        assert_eq!(e.class(), FailureClass::ClientError, "{raw:?}");
        assert!(e.to_string().contains(why), "{raw:?}: {e}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_says_nothing_is_let_go_after_the_frame_timeout() {
    let (_a, mut b) = duplex(64);
    let e = read_hello(&mut b).await.unwrap_err();
    assert!(e.to_string().contains("no frame within 10s"), "{e}");
}

#[tokio::test]
async fn an_answer_without_a_known_class_is_an_error() {
    for (raw, why) in [
        (&b"\x00\x0bclass=bogus"[..], "an unknown class \"bogus\""),
        (&b"\x00\x07detail="[..], "an answer without a class"),
    ] {
        let (mut a, mut b) = duplex(64);
        a.write_all(raw).await.unwrap();
        let e = read_answer(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{raw:?}");
        assert!(e.to_string().contains(why), "{raw:?}: {e}");
    }
}

#[test]
fn what_does_not_fit_a_frame_is_left_out_or_cut_at_a_character() {
    let long = "é".repeat(MAX_FRAME);
    let h = Hello {
        peer: Some(HeaderValue::from_str(&"p".repeat(MAX_FRAME)).unwrap()),
        trace: None,
    };
    assert_eq!(
        parse_hello(&hello_frame(&h)[2..]).unwrap(),
        Hello::default()
    );
    let a = Answer::Refused {
        class: FailureClass::ConnectRefused,
        detail: long.clone(),
    };
    let f = answer_frame(&a);
    assert!(
        f.len() - 2 <= MAX_FRAME && f.len() - 2 > MAX_FRAME - 4,
        "{}",
        f.len()
    );
    match parse_answer(&f[2..]).unwrap() {
        Answer::Refused { class, detail } => {
            assert_eq!(class, FailureClass::ConnectRefused);
            assert!(detail.len() > 2000 && long.starts_with(&detail));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_trace_context_not_valid_is_skipped_not_refused() {
    let h = parse_hello(b"traceparent=00-zz-1-01\npeer=a\n").unwrap();
    assert_eq!(h.trace, None);
    assert_eq!(h.peer, Some(HeaderValue::from_static("a")));
}
