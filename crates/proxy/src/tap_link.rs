//! The tap's link to the control plane: follow the taps it asks for (`GET /v1/tap`, one
//! JSON line with the whole set each time it changes) and send what they copy (`POST
//! /v1/tap/events`), both on the connection the proxy holds for xDS. See [`crate::tap`].

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    control_link::{Control, Link},
    shared::Shared,
    tap::TapSpec,
};

/// Follow the control plane's taps for `workload` while there is a connection, and send
/// what they copy.
pub(crate) async fn run(shared: Arc<Shared>, workload: String, mut link: Link) {
    let rx = shared
        .telemetry
        .taps
        .rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(rx) = rx {
        tokio::spawn(send(rx, link.clone(), workload.replace('/', "%2F")));
    }
    loop {
        let ctl = link.borrow_and_update().clone();
        if let Some(ctl) = ctl {
            tokio::select! {
                r = follow(&shared, &ctl, &workload) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "tap stream ended");
                    }
                }
                _ = link.changed() => {}
            }
            // No taps without a control plane to send them to.
            shared.telemetry.taps.replace(Vec::new());
            tokio::time::sleep(Duration::from_millis(500)).await;
        } else if link.changed().await.is_err() {
            return;
        }
    }
}

/// One `GET /v1/tap` stream: each line is the whole set of taps.
async fn follow(shared: &Shared, ctl: &Control, workload: &str) -> Result<(), String> {
    use tonic::codegen::Service;
    let req = http::Request::get(format!(
        "http://{}/v1/tap?workload={}",
        ctl.authority,
        workload.replace('/', "%2F")
    ))
    .body(tonic::body::Body::empty())
    .map_err(|e| e.to_string())?;
    let mut ch = ctl.channel.clone();
    std::future::poll_fn(|cx| ch.poll_ready(cx))
        .await
        .map_err(|e| e.to_string())?;
    let resp = ch.call(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(n) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=n).collect();
            #[derive(Deserialize)]
            struct Set {
                taps: Vec<TapSpec>,
            }
            match serde_json::from_slice::<Set>(&line) {
                Ok(s) => shared.telemetry.taps.replace(s.taps),
                Err(e) => tracing::warn!(error = %e, "tap: an unreadable set of taps"),
            }
        }
    }
    Ok(())
}

/// Send queued events in batches (a JSON array) as they come.
async fn send(mut rx: mpsc::Receiver<Bytes>, link: Link, workload: String) {
    use tonic::codegen::Service;
    while let Some(first) = rx.recv().await {
        let mut body = Vec::with_capacity(4096);
        body.push(b'[');
        body.extend_from_slice(&first);
        // What else is queued now goes in the same request.
        while body.len() < 256 << 10 {
            match rx.try_recv() {
                Ok(e) => {
                    body.push(b',');
                    body.extend_from_slice(&e);
                }
                Err(_) => break,
            }
        }
        body.push(b']');
        let ctl = link.borrow().clone();
        let Some(ctl) = ctl else {
            continue;
        };
        let Ok(req) = http::Request::post(format!(
            "http://{}/v1/tap/events?workload={workload}",
            ctl.authority
        ))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(body),
        ))) else {
            continue;
        };
        let mut ch = ctl.channel.clone();
        let sent = async {
            std::future::poll_fn(|cx| ch.poll_ready(cx)).await.ok()?;
            let r = ch.call(req).await.ok()?;
            let _ = r.into_body().collect().await;
            Some(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), sent).await;
    }
}
