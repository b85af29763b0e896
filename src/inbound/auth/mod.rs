//! Command authorisation: a command runs only under a platform-signed attestation that a server
//! key, or the paired owner's scoped key, authorised it for this device, now.
//!
//! The device trusts nothing the broker or the network says. [`decide`] is a pure function of
//! (attestation bytes, trust bundle, pairing, clock, replay table) → [`Verdict`], so each rule
//! is unit-testable; [`Authorizer`] wraps it with the state that must survive restarts (the
//! trust store and the replay journal) and the audit log. docs/SECURITY.md says what each check
//! defends against.

pub mod claims;
pub mod jws;
pub(crate) mod refusals;
pub mod replay;
pub mod trust;

use std::path::Path;

use ed25519_dalek::VerifyingKey;

use crate::inbound::reply::{ErrorCode, Reply};
use crate::model::clock::Clock;
use claims::{AttestationClaims, KeyKind, ATTESTATION_TYP};
use refusals::RefusalCache;
use replay::{LoadReport, ReplayError, ReplayWindow};
use trust::{BundleRejected, TrustBundle, TrustStore};

/// Largest attestation accepted, checked before any decoding.
pub const MAX_ATTESTATION_BYTES: usize = 8 * 1024;
/// Longest validity (`exp - iat`) accepted. It bounds how long a replay entry must be kept.
pub const MAX_LIFETIME_SECS: u64 = 3_600;
/// The one command only a server key may send: it removes the owner's access.
pub const SERVER_ONLY_SLUG: &str = "agent:unpair";
/// Longest command id accepted.
pub const MAX_COMMAND_ID_LEN: usize = 128;
/// The earliest time the gateway believes before any platform-signed time has raised its floor:
/// the build's date (see build.rs). A fresh install booting at 1970 thus still refuses a
/// years-old bundle or attestation as expired (docs/PROTOCOL.md 8).
pub const BUILD_TIME_FLOOR: u64 = parse_unix_seconds(env!("TEXTURE_AGENT_TIME_FLOOR"));

const fn parse_unix_seconds(text: &str) -> u64 {
    let bytes = text.as_bytes();
    let mut value = 0u64;
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "TEXTURE_AGENT_TIME_FLOOR");
        value = value * 10 + (bytes[i] - b'0') as u64;
        i += 1;
    }
    value
}

/// Everything a decision depends on besides the attestation itself.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub device_id: &'a str,
    /// The customer/workspace this device belongs to; `None` refuses every command.
    pub workspace_id: Option<&'a str>,
    /// The paired owner's reference id; `None` when unpaired.
    pub owner: Option<&'a str>,
    pub trust: Option<&'a TrustBundle>,
    pub issuer: &'a str,
    /// Effective time: the later of the system clock and the time floor (docs/PROTOCOL.md 8).
    pub now: u64,
    pub skew: u64,
}

/// Why a command was refused; `reason` is a stable slug for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub reason: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl Refusal {
    fn new(code: ErrorCode, reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Verified and authorised: run it.
    Allow(Box<AttestationClaims>),
    /// Not run. `claims` is set when the signature verified (so the id can be echoed and
    /// recorded), `None` when nothing in the message can be trusted.
    Refuse {
        claims: Option<Box<AttestationClaims>>,
        refusal: Refusal,
    },
    /// A verified command id already in the replay table: never run twice.
    Duplicate {
        claims: Box<AttestationClaims>,
        recorded_reply: Option<Vec<u8>>,
    },
}

/// The id of a command to be refused unread (shed, PROTOCOL 7.1): the `jti` of an attestation
/// of at most [`MAX_ATTESTATION_BYTES`], read without verifying anything. Only for addressing
/// that refusal (see [`jws::peek_jti`]); the link and the router both shed, through this.
pub(crate) fn peek_command_id(attestation: &[u8]) -> Option<String> {
    jws::peek_jti(attestation, MAX_ATTESTATION_BYTES)
}

/// Check 16 of the decision order (docs/PROTOCOL.md 7.1): what a command id may look like.
pub(crate) fn is_valid_command_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_COMMAND_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The authorisation decision. Pure: no I/O, no clock, no randomness.
///
/// The checks run in the order of docs/PROTOCOL.md 7.1, one stage per function below; the
/// first that fails decides the reply and nothing after it is evaluated.
pub fn decide(token: &[u8], ctx: &Context<'_>, replay: &ReplayWindow) -> Verdict {
    let (bundle, claims) = match authenticate(token, ctx) {
        Ok(authenticated) => authenticated,
        Err(refusal) => return refused_unverified(refusal),
    };
    if let Err(refusal) = well_formed(&claims, ctx.issuer) {
        return refused_unverified(refusal);
    }
    // 3. Replay: a verified id seen before gets its recorded reply, whatever else is true now.
    if let Some(entry) = replay.get(&claims.jti) {
        return Verdict::Duplicate {
            recorded_reply: entry.reply.clone(),
            claims: Box::new(claims),
        };
    }
    let refusal = time_refusal(&claims, ctx)
        .or_else(|| scope_refusal(&claims, ctx, bundle))
        .or_else(|| key_refusal(&claims, ctx.owner));
    match refusal {
        Some(refusal) => Verdict::Refuse {
            claims: Some(Box::new(claims)),
            refusal,
        },
        None => Verdict::Allow(Box::new(claims)),
    }
}

/// A refusal of a message whose claims are not to be trusted (or were never read).
fn refused_unverified(refusal: Refusal) -> Verdict {
    Verdict::Refuse {
        claims: None,
        refusal,
    }
}

fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::Unauthenticated, reason, message)
}

/// Stage 1, authenticity: only a current platform key's signature counts, and the payload must name
/// the key that signed it. Returns the bundle in force and the verified claims.
fn authenticate<'c>(
    token: &[u8],
    ctx: &Context<'c>,
) -> Result<(&'c TrustBundle, AttestationClaims), Refusal> {
    let Some(bundle) = ctx.trust else {
        return Err(unauthenticated(
            "no-trust-bundle",
            "no trust bundle received yet; no platform key is trusted",
        ));
    };
    if bundle.expires_at <= ctx.now {
        return Err(unauthenticated(
            "trust-bundle-expired",
            "the trust bundle has expired; waiting for a newer one",
        ));
    }
    let lookup = |kid: Option<&str>| -> Option<&VerifyingKey> { kid.and_then(|k| bundle.key(k)) };
    let verified =
        jws::verify(token, MAX_ATTESTATION_BYTES, ATTESTATION_TYP, lookup).map_err(|e| {
            let reason = match e {
                jws::JwsError::UnknownKey(_) => "unknown-key",
                jws::JwsError::BadSignature => "bad-signature",
                jws::JwsError::Algorithm(_) => "algorithm",
                _ => "malformed",
            };
            unauthenticated(reason, e.to_string())
        })?;
    let claims: AttestationClaims = serde_json::from_slice(&verified.payload)
        .map_err(|e| unauthenticated("malformed", format!("attestation payload: {e}")))?;
    // 2 begins here: the signed kid must be the one the header named.
    if Some(claims.kid.as_str()) != verified.header.kid.as_deref() {
        return Err(unauthenticated(
            "malformed",
            "payload kid differs from header kid",
        ));
    }
    Ok((bundle, claims))
}

/// Stage 2, well-formedness of what the platform signed.
fn well_formed(claims: &AttestationClaims, issuer: &str) -> Result<(), Refusal> {
    if claims.iss != issuer {
        return Err(unauthenticated(
            "issuer",
            format!("issuer {:?} is not {:?}", claims.iss, issuer),
        ));
    }
    if !is_valid_command_id(&claims.jti) {
        return Err(unauthenticated(
            "malformed",
            "jti must be 1-128 characters of [A-Za-z0-9._:-]",
        ));
    }
    if claims.exp <= claims.iat || claims.exp - claims.iat > MAX_LIFETIME_SECS {
        return Err(unauthenticated(
            "malformed",
            format!(
                "validity must be 1..={MAX_LIFETIME_SECS} s (iat {}, exp {})",
                claims.iat, claims.exp
            ),
        ));
    }
    if (claims.api_key_kind == KeyKind::Scoped) != claims.reference_id.is_some() {
        return Err(unauthenticated(
            "malformed",
            "referenceId must be present exactly for scoped keys",
        ));
    }
    Ok(())
}

/// Stage 4, time, against the later of the system clock and the time floor.
fn time_refusal(claims: &AttestationClaims, ctx: &Context<'_>) -> Option<Refusal> {
    if claims.iat > ctx.now.saturating_add(ctx.skew) {
        let message = format!(
            "issued at {} but now is {} (skew {} s)",
            claims.iat, ctx.now, ctx.skew
        );
        return Some(Refusal::new(
            ErrorCode::AttestationNotYetValid,
            "not-yet-valid",
            message,
        ));
    }
    if claims.exp.saturating_add(ctx.skew) <= ctx.now {
        let message = format!(
            "expired at {} and now is {} (skew {} s)",
            claims.exp, ctx.now, ctx.skew
        );
        return Some(Refusal::new(
            ErrorCode::AttestationExpired,
            "expired",
            message,
        ));
    }
    None
}

/// Stage 5, scope: this device, its workspace, a key the bundle has not revoked.
fn scope_refusal(
    claims: &AttestationClaims,
    ctx: &Context<'_>,
    bundle: &TrustBundle,
) -> Option<Refusal> {
    if claims.aud != ctx.device_id {
        let message = format!("attestation is for device {:?}", claims.aud);
        return Some(Refusal::new(ErrorCode::Forbidden, "wrong-device", message));
    }
    if ctx.workspace_id != Some(claims.workspace_id.as_str()) {
        let message = format!(
            "workspace {:?} does not own this device",
            claims.workspace_id
        );
        return Some(Refusal::new(
            ErrorCode::Forbidden,
            "wrong-workspace",
            message,
        ));
    }
    if bundle.is_revoked(&claims.api_key_id) {
        let message = format!("API key {:?} is revoked", claims.api_key_id);
        return Some(Refusal::new(ErrorCode::Forbidden, "revoked-key", message));
    }
    None
}

/// Stage 6, the key's kind: server keys command everything (and alone may unpair), connect keys
/// nothing, scoped keys only while their user is the paired owner.
fn key_refusal(claims: &AttestationClaims, owner: Option<&str>) -> Option<Refusal> {
    let unpair = claims.command.slug == SERVER_ONLY_SLUG;
    let (code, reason, message) = match claims.api_key_kind {
        KeyKind::Server if unpair && !claims.command.input.is_empty() => (
            ErrorCode::ValidationError,
            "malformed-input",
            format!("{SERVER_ONLY_SLUG} takes no input"),
        ),
        KeyKind::Server => return None,
        _ if unpair => (
            ErrorCode::Forbidden,
            "server-key-required",
            format!("{SERVER_ONLY_SLUG} requires a server key"),
        ),
        KeyKind::Connect => (
            ErrorCode::Forbidden,
            "connect-key",
            "connect keys may only create Connect links".into(),
        ),
        KeyKind::Scoped => match owner {
            None => (
                ErrorCode::Forbidden,
                "not-paired",
                "device is not paired; scoped keys cannot command it".into(),
            ),
            Some(owner) if claims.reference_id.as_deref() == Some(owner) => return None,
            Some(_) => (
                ErrorCode::Forbidden,
                "not-owner",
                "scoped key belongs to another user".into(),
            ),
        },
    };
    Some(Refusal::new(code, reason, message))
}

/// What the command pipeline should do with a message.
#[derive(Debug)]
pub enum Authorization {
    /// Run the command, then call [`Authorizer::complete`] with the reply.
    Execute(Box<AttestationClaims>),
    /// Publish this reply and do nothing else.
    Reply(Vec<u8>),
    /// A duplicate of a command still running: its reply will follow once it completes.
    InProgress,
}

/// Settings for [`Authorizer::open`].
#[derive(Debug, Clone)]
pub struct AuthorizerConfig {
    pub device_id: String,
    /// From the configuration; when unset, the owner binding's workspace is used.
    pub workspace_id: Option<String>,
    pub root: VerifyingKey,
    pub issuer: String,
    pub skew: u64,
    pub replay_capacity: usize,
}

/// The stateful side: trust store, replay journal, recent refusals, pairing state and audit log.
#[derive(Debug)]
pub struct Authorizer {
    config: AuthorizerConfig,
    trust: TrustStore,
    replay: ReplayWindow,
    refusals: RefusalCache,
    /// The agent's one clock. Its floor mirrors the replay journal's, which owns it.
    clock: Clock,
}

/// The pairing state as authorisation sees it, borrowed from `pairing::PairingState` (its one
/// owner) at each decision and never kept, so a command is always judged against the owner in
/// force when it arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner<'a> {
    /// The paired owner's reference id; `None` when unpaired (every scoped key is refused).
    pub reference_id: Option<&'a str>,
    /// The workspace the owner binding names, used only when the configuration fixes none.
    pub workspace_id: Option<&'a str>,
}

impl<'a> Owner<'a> {
    /// No owner: only server keys of the configured workspace may command the gateway.
    pub const UNPAIRED: Owner<'static> = Owner {
        reference_id: None,
        workspace_id: None,
    };

    /// Paired to `reference_id`, with no workspace from the binding.
    pub fn paired(reference_id: &'a str) -> Owner<'a> {
        Owner {
            reference_id: Some(reference_id),
            workspace_id: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorizerError {
    #[error("replay journal: {0}")]
    Replay(#[from] crate::storage::StorageError),
    #[error("trust state: {0}")]
    TrustState(crate::storage::StorageError),
}

impl Authorizer {
    /// Opens the persisted trust bundle and replay journal in `state_dir`.
    pub fn open(
        config: AuthorizerConfig,
        state_dir: &Path,
    ) -> Result<(Authorizer, LoadReport), AuthorizerError> {
        let trust = TrustStore::open(config.root, &config.issuer, state_dir);
        trust.persist_state().map_err(AuthorizerError::TrustState)?;
        // The floor starts from platform-signed evidence only, never from the clock: a clock
        // running ahead at start-up must not make live replay entries look forgettable.
        let floor = BUILD_TIME_FLOOR.max(trust.highest_issued_at());
        let (replay, report) = ReplayWindow::open(state_dir, config.replay_capacity, floor)?;
        if report.damaged_lines > 0 {
            tracing::warn!(
                damaged_lines = report.damaged_lines,
                "replay journal had damaged lines; skipped"
            );
        }
        Ok((
            Authorizer {
                config,
                trust,
                replay,
                refusals: RefusalCache::default(),
                clock: Clock::system(),
            }
            .with_floor_synced(),
            report,
        ))
    }

    /// Mirrors the replay journal's floor into the shared clock, after anything that may
    /// have raised it.
    fn with_floor_synced(self) -> Authorizer {
        self.sync_floor();
        self
    }

    fn sync_floor(&self) {
        self.clock.raise_floor(self.replay.time_floor());
    }

    /// The effective time: the later of the system clock and the time floor (see `replay`).
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The agent's clock, whose floor this authorizer keeps raised; every other part of the
    /// agent reads a clone of it.
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// Replaces the system clock (Unix seconds) this authorizer reads, for tests of wrong
    /// clocks. Nothing the replay journal forgets depends on it (see `replay`).
    pub fn set_clock(&mut self, clock: fn() -> u64) {
        self.clock = self.clock.with_source(clock);
    }

    /// The time floor: the latest platform-signed time seen (docs/PROTOCOL.md 8).
    pub fn time_floor(&self) -> u64 {
        self.replay.time_floor()
    }

    pub fn trust_bundle(&self) -> Option<&TrustBundle> {
        self.trust.current()
    }

    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    pub fn configured_workspace(&self) -> Option<&str> {
        self.config.workspace_id.as_deref()
    }

    /// Offers a trust bundle from the platform; logs the outcome.
    pub fn offer_trust_bundle(&mut self, bytes: &[u8]) -> Result<Option<u64>, BundleRejected> {
        let now = self.now();
        let result = self.trust.offer(bytes, now);
        if let Ok(Some(_)) = result {
            self.replay.raise_floor(self.trust.highest_issued_at());
            self.sync_floor();
        }
        match &result {
            Ok(Some(version)) => tracing::info!(version, "trust bundle accepted"),
            Ok(None) => tracing::debug!("trust bundle unchanged"),
            Err(error) => tracing::warn!(%error, "trust bundle rejected"),
        }
        result
    }

    /// Decides on an inbound attestation against the pairing state in force (`owner`),
    /// records it durably when verified, and audits it.
    pub fn authorize(&mut self, token: &[u8], owner: Owner<'_>) -> Authorization {
        let authorization = self.decide_and_record(token, owner);
        self.sync_floor();
        authorization
    }

    fn decide_and_record(&mut self, token: &[u8], owner: Owner<'_>) -> Authorization {
        let now = self.now();
        let ctx = Context {
            device_id: &self.config.device_id,
            workspace_id: self.config.workspace_id.as_deref().or(owner.workspace_id),
            owner: owner.reference_id,
            trust: self.trust.current(),
            issuer: &self.config.issuer,
            now,
            skew: self.config.skew,
        };
        let verdict = decide(token, &ctx, &self.replay);
        // A verified id refused before gets that refusal again, even if pairing or trust changed
        // in between (best effort: the cache may have forgotten it, and then it is judged anew).
        let verified = match &verdict {
            Verdict::Allow(c)
            | Verdict::Refuse {
                claims: Some(c), ..
            } => Some(c),
            _ => None,
        };
        if let Some(c) = verified {
            if let Some(reply) = self.refusals.get(&c.jti) {
                audit(Some(c), "duplicate", "command id refused before");
                return Authorization::Reply(reply.to_vec());
            }
        }
        match verdict {
            Verdict::Allow(claims) => self.record_allowed(claims, now),
            Verdict::Refuse { claims, refusal } => {
                Authorization::Reply(self.remember_refusal(claims, &refusal))
            }
            Verdict::Duplicate {
                claims,
                recorded_reply,
            } => {
                audit(Some(&claims), "duplicate", "command id already seen");
                match recorded_reply {
                    Some(reply) => Authorization::Reply(reply),
                    None => Authorization::InProgress,
                }
            }
        }
    }

    /// Records an allowed command durably before it may run; without a durable record it
    /// could run twice, so a journal that cannot take it refuses it instead.
    fn record_allowed(&mut self, claims: Box<AttestationClaims>, now: u64) -> Authorization {
        let forget_after = claims.exp.saturating_add(self.config.skew);
        let target = claims.command.device_id.as_deref();
        let error = match self
            .replay
            .record_for(&claims.jti, target, claims.iat, forget_after, now)
        {
            Ok(()) => {
                audit(Some(&claims), "allowed", "authorised");
                return Authorization::Execute(claims);
            }
            Err(error) => error,
        };
        let refusal = match error {
            ReplayError::Full {
                retry_after_secs, ..
            } => Refusal {
                code: ErrorCode::RateLimited,
                reason: "replay-table-full",
                message: error.to_string(),
                retry_after: Some(retry_after_secs),
            },
            ReplayError::Storage(_) => Refusal::new(
                ErrorCode::Unavailable,
                "replay-journal-unwritable",
                format!("cannot record the command durably: {error}"),
            ),
        };
        audit(Some(&claims), "refused", refusal.reason);
        Authorization::Reply(self.refusal_reply(Some(&claims), &refusal))
    }

    /// The reply to a refused command, remembered when it is a verified refusal addressed to
    /// this device: in the evicting cache and never in the replay journal, so callers with no
    /// right to command the gateway do not take capacity from commands that can run. Refusals
    /// about time are not kept: the same attestation may be valid once the clock is right.
    fn remember_refusal(
        &mut self,
        claims: Option<Box<AttestationClaims>>,
        refusal: &Refusal,
    ) -> Vec<u8> {
        audit(claims.as_deref(), "refused", refusal.reason);
        tracing::debug!(message = %refusal.message, "refusal detail");
        let reply = self.refusal_reply(claims.as_deref(), refusal);
        let device_id = self.config.device_id.as_str();
        let about_time = matches!(
            refusal.code,
            ErrorCode::AttestationExpired | ErrorCode::AttestationNotYetValid
        );
        if let Some(c) = claims.filter(|c| c.aud == device_id && !about_time) {
            self.refusals.insert(&c.jti, reply.clone());
        }
        reply
    }

    /// Commands recorded as accepted but never completed: the agent stopped while they ran.
    /// Each is `(command id, issued-at, target device)`.
    pub fn interrupted(&self, ids: &[String]) -> Vec<(String, u64, Option<String>)> {
        ids.iter()
            .filter_map(|id| {
                let e = self.replay.get(id)?;
                e.reply
                    .is_none()
                    .then(|| (id.clone(), e.issued_at, e.target.clone()))
            })
            .collect()
    }

    /// Records the reply of an executed command, so duplicates get it too.
    pub fn complete(&mut self, command_id: &str, reply: &[u8]) {
        if let Err(error) = self.replay.complete(command_id, reply) {
            tracing::error!(%error, command_id, "could not record the command's reply");
        }
    }

    fn refusal_reply(&self, claims: Option<&AttestationClaims>, refusal: &Refusal) -> Vec<u8> {
        Reply::Refused {
            command_id: claims.map(|c| c.jti.clone()),
            device_id: self.config.device_id.clone(),
            status: refusal.code.status(),
            code: refusal.code,
            message: refusal.message.clone(),
            retry_after: refusal.retry_after,
        }
        .to_bytes()
    }
}

/// One structured audit line per decision.
fn audit(claims: Option<&AttestationClaims>, decision: &'static str, reason: &str) {
    match claims {
        Some(c) => tracing::info!(
            command_id = %c.jti,
            key_id = %c.api_key_id,
            key_kind = %c.api_key_kind,
            slug = %c.command.slug,
            decision,
            reason,
            "command decision"
        ),
        None => tracing::warn!(decision, reason, "command decision"),
    }
}
