//! Running authorised commands.
//!
//! Only the agent's own built-in `agent:ping` exists so far; every other slug is answered with a
//! validation error naming it, so an authorised but unsupported command fails loudly instead of
//! silently succeeding.

use serde_json::json;

use crate::auth::claims::AttestationClaims;
use crate::reply::{rfc3339, ErrorCode, FailedError, Reply};

/// Runs `claims.command` and returns the reply to publish.
pub fn execute(claims: &AttestationClaims, device_id: &str, now: u64) -> Reply {
    let outcome: Result<serde_json::Value, (ErrorCode, String)> = match claims.command.slug.as_str()
    {
        "agent:ping" => match claims.command.input.keys().next() {
            None => Ok(json!({ "pong": true })),
            Some(field) => Err((
                ErrorCode::ValidationError,
                format!("agent:ping takes no input; unknown field `{field}`"),
            )),
        },
        other => Err((
            ErrorCode::ValidationError,
            format!("unknown command slug `{other}`"),
        )),
    };
    reply_for(claims, device_id, now, outcome)
}

/// The reply for a built-in handled outside this module (like `agent:unpair`), whose failure
/// is an internal error rather than bad input.
pub fn builtin_reply(
    claims: &AttestationClaims,
    device_id: &str,
    now: u64,
    outcome: Result<serde_json::Value, String>,
) -> Reply {
    reply_for(
        claims,
        device_id,
        now,
        outcome.map_err(|message| (ErrorCode::CommandFailed, message)),
    )
}

fn reply_for(
    claims: &AttestationClaims,
    device_id: &str,
    now: u64,
    outcome: Result<serde_json::Value, (ErrorCode, String)>,
) -> Reply {
    let (issued_at, executed_at) = (rfc3339(claims.iat), rfc3339(now));
    match outcome {
        Ok(result) => Reply::Succeeded {
            command_id: claims.jti.clone(),
            device_id: device_id.to_owned(),
            issued_at,
            executed_at,
            status: 200,
            result,
        },
        Err((code, message)) => Reply::Failed {
            command_id: claims.jti.clone(),
            device_id: device_id.to_owned(),
            issued_at,
            executed_at,
            status: code.status(),
            error: FailedError { code, message },
        },
    }
}
