//! A minimal HTTP/1.1 client for the simulator's API, used by the demo and the tests exactly as
//! `curl` would use it (one request per connection, JSON bodies). Small enough that an HTTP client
//! crate would be more code to audit than this.

use std::net::SocketAddr;

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one request; returns the status and the JSON body (`Null` when empty).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    api_key: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .context("connecting to the API")?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if let Some(key) = api_key {
        head.push_str(&format!("Texture-Api-Key: {key}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut response = Vec::new();
    stream.take(4 << 20).read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body.trim()).with_context(|| format!("non-JSON body: {body}"))?
    };
    Ok((status, value))
}
