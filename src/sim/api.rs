//! The simulator's HTTP API, shaped like the platform's public one (docs/PROTOCOL.md,
//! "Simulated platform API"). Keys go in the `Texture-Api-Key` header; errors are `{code, message}`
//! with 401 for a missing or unknown key, 403 for the wrong kind or scope and 400 for validation.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

use super::{CommandRecord, KeyRecord, PlatformState, WORKSPACE};
use crate::inbound::auth::claims::KeyKind;
use crate::sim::platform::AttestedCommand;

#[derive(Clone)]
struct Api {
    state: Arc<Mutex<PlatformState>>,
    mqtt: AsyncClient,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "code": code, "message": message.into() })),
    )
        .into_response()
}

#[allow(clippy::result_large_err)] // a handler returns the Response as is; boxing buys nothing
fn caller(api: &Api, headers: &HeaderMap) -> Result<KeyRecord, Response> {
    let Some(key) = headers.get("texture-api-key").and_then(|v| v.to_str().ok()) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "missing Texture-Api-Key header",
        ));
    };
    match api.state.lock().expect("state").key(key) {
        Some(k) if !k.revoked => Ok(k.clone()),
        Some(_) => Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "this API key has been revoked",
        )),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "unknown API key",
        )),
    }
}

/// Key management is for server keys only.
#[allow(clippy::result_large_err)]
fn server_caller(api: &Api, headers: &HeaderMap) -> Result<KeyRecord, Response> {
    let key = caller(api, headers)?;
    if key.kind != KeyKind::Server {
        return Err(error(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "only a server key may manage keys",
        ));
    }
    Ok(key)
}

/// Starts the API on an ephemeral loopback port.
pub async fn serve(
    state: Arc<Mutex<PlatformState>>,
    mqtt: AsyncClient,
) -> anyhow::Result<SocketAddr> {
    let api = Api { state, mqtt };
    let app = Router::new()
        .route("/v1/connections", post(create_connection))
        .route("/v1/connections/{id}/complete", post(complete_connection))
        .route("/v1/commands/{type}/{action}", post(create_command))
        .route("/v1/commands/{id}", get(get_command))
        .route("/v1/devices/{id}", get(get_device))
        .route("/v1/api-keys", post(create_key))
        .route("/v1/api-keys/{id}", delete(revoke_key))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "simulator API stopped");
        }
    });
    Ok(addr)
}

/// `POST /v1/connections` (connect key): a Connect link for one end user.
async fn create_connection(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let key = match caller(&api, &headers) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if key.kind != KeyKind::Connect {
        return error(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "only a connect key may create Connect links",
        );
    }
    let body = body.map(|b| b.0).unwrap_or_default();
    let Some(redirect) = body["redirectUrl"].as_str() else {
        return error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "redirectUrl: required",
        );
    };
    let mut s = api.state.lock().expect("state");
    let id = s.next_id("conn_");
    let reference_id = body["referenceId"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("texture-generated:{id}"));
    s.connections.insert(
        id.clone(),
        super::Connection {
            id: id.clone(),
            reference_id: reference_id.clone(),
            redirect_url: redirect.to_owned(),
        },
    );
    (
        StatusCode::CREATED,
        Json(json!({ "id": id, "url": format!("/connect/{id}"), "referenceId": reference_id })),
    )
        .into_response()
}

/// `POST /v1/connections/{id}/complete`: stands in for the end user's browser on the Connect
/// page. With `pairingCode` it pairs the gateway showing that code to this user (the signed
/// owner binding goes to the gateway); either way it "redirects" with a new scoped key.
async fn complete_connection(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: Option<Json<Value>>,
) -> Response {
    let body = body.map(|b| b.0).unwrap_or_default();
    let (binding, redirect, scoped) = {
        let mut s = api.state.lock().expect("state");
        let Some(conn) = s.connections.get(&id).cloned() else {
            return error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                format!("no connection {id}"),
            );
        };
        let mut binding = None;
        if let Some(code) = body["pairingCode"].as_str() {
            let found = s.pairing_requests.iter().find_map(|(gw, req)| {
                (crate::inbound::pairing::code::commitment(gw, code).as_deref()
                    == Some(req.code_commitment.as_str())
                    && req.expires_at > crate::model::clock::system_secs())
                .then(|| (gw.clone(), req.code_commitment.clone()))
            });
            let Some((gateway, commitment)) = found else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "VALIDATION_ERROR",
                    "pairingCode: no gateway is showing this code",
                );
            };
            let version = s.binding_versions.get(&gateway).copied().unwrap_or(0) + 1;
            s.binding_versions.insert(gateway.clone(), version);
            s.pairing_requests.remove(&gateway);
            let token = s.signer.owner_binding(
                &gateway,
                WORKSPACE,
                &conn.reference_id,
                version,
                crate::model::clock::system_secs(),
                &commitment,
            );
            binding = Some((gateway, token));
        }
        let scoped = s.add_key(KeyKind::Scoped, Some(conn.reference_id.clone()));
        let redirect = format!("{}?texture_scoped_key={}", conn.redirect_url, scoped.key);
        (binding, redirect, scoped)
    };
    if let Some((gateway, token)) = &binding {
        let topic = format!(
            "{}/devices/{gateway}/pairing/binding",
            crate::link::topics::ROOT
        );
        if api
            .mqtt
            .publish(topic, QoS::AtLeastOnce, false, token.as_bytes().to_vec())
            .await
            .is_err()
        {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "broker unavailable",
            );
        }
    }
    Json(json!({
        "redirect": redirect,
        "scopedKey": scoped.key,
        "referenceId": scoped.reference_id,
        "pairedGateway": binding.map(|(g, _)| g),
    }))
    .into_response()
}

/// `POST /v1/commands/{type}/{action}` with `{deviceId, input}`.
/// A command signed for the gateway that has its device, and recorded as pending.
struct PendingCommand {
    gateway: String,
    token: String,
    record: CommandRecord,
}

/// Signs the command with the caller's key and records it; `None` when no gateway has the
/// device. The platform signs for whichever gateway the device is behind, so a command for the
/// gateway itself carries gateway claims, any other device claims.
fn sign_and_record(
    s: &mut PlatformState,
    key: &KeyRecord,
    device_id: &str,
    slug: String,
    input: Value,
) -> Option<PendingCommand> {
    let gateway = s.gateway_of(device_id)?;
    let id = s.next_id("cmd_");
    let api_key = s.api_key(key);
    let now = crate::model::clock::system_secs();
    let command = AttestedCommand::new(&gateway, &id, &slug, input);
    let command = if gateway == device_id {
        command
    } else {
        command.for_device(device_id)
    };
    let claims = s.signer.claims(&api_key, command, now, 300);
    let token = s.signer.attest(&claims);
    let record = CommandRecord {
        id: id.clone(),
        status: "pending".into(),
        device_id: device_id.to_owned(),
        command: slug,
        created_at: crate::inbound::reply::rfc3339(now),
        result: None,
        error: None,
    };
    s.commands.insert(id, record.clone());
    Some(PendingCommand {
        gateway,
        token,
        record,
    })
}

async fn create_command(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((kind, action)): Path<(String, String)>,
    body: Option<Json<Value>>,
) -> Response {
    let key = match caller(&api, &headers) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if key.kind == KeyKind::Connect {
        return error(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "connect keys may only create Connect links",
        );
    }
    let body = body.map(|b| b.0).unwrap_or_default();
    let Some(device_id) = body["deviceId"].as_str().map(str::to_owned) else {
        return error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "deviceId: required",
        );
    };
    let input = body.get("input").cloned().unwrap_or_else(|| json!({}));
    if !input.is_object() {
        return error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "input: expected an object",
        );
    }
    let slug = format!("{kind}:{action}");
    let signed = sign_and_record(
        &mut api.state.lock().expect("state"),
        &key,
        &device_id,
        slug,
        input,
    );
    let Some(PendingCommand {
        gateway,
        token,
        record,
    }) = signed
    else {
        return error(
            StatusCode::NOT_FOUND,
            "DEVICE_NOT_FOUND",
            format!("no device {device_id}"),
        );
    };
    let topic = format!("{}/devices/{gateway}/commands", crate::link::topics::ROOT);
    if api
        .mqtt
        .publish(topic, QoS::AtLeastOnce, false, token.into_bytes())
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "broker unavailable",
        );
    }
    (StatusCode::CREATED, Json(json!(record))).into_response()
}

async fn get_command(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = caller(&api, &headers) {
        return r;
    }
    match api.state.lock().expect("state").commands.get(&id) {
        Some(c) => Json(json!(c)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no command {id}"),
        ),
    }
}

async fn get_device(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let key = match caller(&api, &headers) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if key.kind == KeyKind::Connect {
        return error(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "connect keys cannot read devices",
        );
    }
    match api.state.lock().expect("state").devices.get(&id) {
        Some(d) => Json(json!({
            "id": d.id,
            "type": d.device_type,
            "state": d.state,
            "availableCommands": d.available_commands,
            "updatedAt": d.updated_at,
        }))
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "DEVICE_NOT_FOUND",
            format!("no device {id}"),
        ),
    }
}

/// `POST /v1/api-keys {name, type}` (server key).
async fn create_key(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    if let Err(r) = server_caller(&api, &headers) {
        return r;
    }
    let body = body.map(|b| b.0).unwrap_or_default();
    let kind = match body["type"].as_str() {
        Some("SERVER") => KeyKind::Server,
        Some("CONNECT") => KeyKind::Connect,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                format!("type: expected \"SERVER\" or \"CONNECT\", found {other:?}"),
            )
        }
    };
    let record = api.state.lock().expect("state").add_key(kind, None);
    (
        StatusCode::CREATED,
        Json(json!({ "id": record.id, "key": record.key, "type": body["type"] })),
    )
        .into_response()
}

/// `DELETE /v1/api-keys/{id}` (server key): revokes any key and publishes a new trust bundle.
async fn revoke_key(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = server_caller(&api, &headers) {
        return r;
    }
    let bundle = {
        let mut s = api.state.lock().expect("state");
        let Some(k) = s.keys.iter_mut().find(|k| k.id == id) else {
            return error(StatusCode::NOT_FOUND, "NOT_FOUND", format!("no key {id}"));
        };
        k.revoked = true;
        s.bundle_version += 1;
        s.trust_bundle()
    };
    if api
        .mqtt
        .publish(
            crate::link::topics::Topics::trust_bundle(),
            QoS::AtLeastOnce,
            true,
            bundle.into_bytes(),
        )
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "broker unavailable",
        );
    }
    Json(json!({ "id": id, "revoked": true })).into_response()
}
