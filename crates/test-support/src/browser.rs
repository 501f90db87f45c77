//! A real browser for tests: Debian's chromium driven through chromedriver over WebDriver
//! (W3C), headless, with a fresh profile; killed (with its children) when dropped. Only what
//! the tests use: open a page, find elements, read text, type, click, accept a dialog, run a
//! script.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{json, Value};

/// The key WebDriver names an element by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver and one browser session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    profile: crate::Temp,
    /// chromedriver's and chromium's `TMPDIR`: chromium makes its scoped directories there,
    /// which a killed browser can leave behind (some clean-clone CI runs left one in `/tmp`).
    _tmp: crate::Temp,
}

/// Why a WebDriver call failed.
#[derive(Debug)]
pub struct WdError(pub String);

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

async fn call(method: &str, url: &str, body: Option<Value>) -> Result<Value, WdError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .map_err(|e| WdError(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| WdError(format!("{method} {url}: {e}")))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| WdError(e.to_string()))?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(WdError(format!("{method} {url}: {status} {v}")));
    }
    Ok(v["value"].clone())
}

impl Browser {
    /// chromium through chromedriver, or `None` (saying so) where they are not installed;
    /// under CI their absence fails.
    pub async fn start() -> Option<Self> {
        let have = |b: &str| std::path::Path::new(b).exists();
        if !have("/usr/bin/chromedriver") || !have("/usr/bin/chromium") {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have chromium and chromium-driver (.ci/setup installs them)"
            );
            eprintln!("skipped: no chromium/chromedriver here");
            return None;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let tmp = crate::Temp::dir("chromium-tmp");
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .env("TMPDIR", &tmp.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let profile = crate::Temp::dir("chromium-profile");
        let mut b = Self {
            driver,
            base,
            session: String::new(),
            profile,
            _tmp: tmp,
        };
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                        format!("--user-data-dir={}", b.profile.0.display()),
                    ],
                },
            }},
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let v = loop {
            match call("POST", &format!("{}/session", b.base), Some(caps.clone())).await {
                Ok(v) => break v,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    panic!("no browser session: {e}")
                }
                // chromedriver is still starting.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        b.session = v["sessionId"].as_str().expect("a session id").to_string();
        Some(b)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    /// Open `url`.
    pub async fn goto(&self, url: &str) -> Result<(), WdError> {
        call("POST", &self.url("/url"), Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    /// The element `css` selects, if there is one now.
    pub async fn find(&self, css: &str) -> Result<String, WdError> {
        let v = call(
            "POST",
            &self.url("/element"),
            Some(json!({ "using": "css selector", "value": css })),
        )
        .await?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| WdError(format!("no element id for {css}: {v}")))
    }

    /// The visible text of element `id`.
    pub async fn text(&self, id: &str) -> Result<String, WdError> {
        let v = call("GET", &self.url(&format!("/element/{id}/text")), None).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Click element `id`.
    pub async fn click(&self, id: &str) -> Result<(), WdError> {
        call(
            "POST",
            &self.url(&format!("/element/{id}/click")),
            Some(json!({})),
        )
        .await
        .map(drop)
    }

    /// Type `text` into element `id` (after clearing it).
    pub async fn type_into(&self, id: &str, text: &str) -> Result<(), WdError> {
        call(
            "POST",
            &self.url(&format!("/element/{id}/clear")),
            Some(json!({})),
        )
        .await?;
        call(
            "POST",
            &self.url(&format!("/element/{id}/value")),
            Some(json!({ "text": text })),
        )
        .await
        .map(drop)
    }

    /// Accept the open dialog (`confirm`), returning its text.
    pub async fn accept_dialog(&self) -> Result<String, WdError> {
        let t = call("GET", &self.url("/alert/text"), None).await?;
        call("POST", &self.url("/alert/accept"), Some(json!({}))).await?;
        Ok(t.as_str().unwrap_or_default().to_string())
    }

    /// A PNG of the page as it is now.
    pub async fn screenshot(&self) -> Result<Vec<u8>, WdError> {
        let v = call("GET", &self.url("/screenshot"), None).await?;
        base64_decode(v.as_str().unwrap_or_default())
            .ok_or_else(|| WdError("the screenshot is not base64".into()))
    }

    /// Run `script` in the page; its return value.
    pub async fn eval(&self, script: &str) -> Result<Value, WdError> {
        call(
            "POST",
            &self.url("/execute/sync"),
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }
}

/// Standard base64 (what WebDriver sends screenshots in).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let take = chunk.len().saturating_sub(1);
        for i in 0..take {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver ends the browser with the session; killing it alone would leave the
        // browser running, so the session is deleted first (on a thread: no runtime here).
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(5), call("DELETE", &url, None)).await
                });
            }
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
