use serde_json::json;

use super::*;
use crate::inbound::auth::trust::TrustStore;
use crate::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};

const NOW: u64 = 1_800_000_000;
const GW: &str = "gw-1";

/// A trust bundle listing `signer`'s keys, expiring at `exp`, accepted before `exp`.
fn trust(signer: &PlatformSigner, exp: u64) -> TrustBundle {
    let d = tempfile::tempdir().unwrap();
    let root = jws::public_key_from_base64(&signer.root_public_key()).unwrap();
    let mut store = TrustStore::open(root, &signer.issuer, d.path());
    store
        .offer(
            signer.trust_bundle(1, NOW - 600, exp, &[]).as_bytes(),
            NOW - 300,
        )
        .unwrap();
    store.current().unwrap().clone()
}

/// The installer's limits: a battery, a vehicle and a thermostat, each bounded.
fn installer() -> Vec<DeviceLimits> {
    vec![
        DeviceLimits {
            min_backup_reserve: Some(20.0),
            min_operating_reserve: Some(10.0),
            max_operating_reserve: Some(90.0),
            ..DeviceLimits::new("bat-1", DeviceType::Battery)
        },
        DeviceLimits {
            max_charge_limit: Some(90.0),
            ..DeviceLimits::new("ev-1", DeviceType::Vehicle)
        },
        DeviceLimits {
            min_target_c: Some(16.0),
            max_target_c: Some(26.0),
            ..DeviceLimits::new("th-1", DeviceType::Thermostat)
        },
    ]
}

struct Bed {
    dir: tempfile::TempDir,
    signer: PlatformSigner,
    trust: TrustBundle,
    policy: SitePolicy,
}

fn bed() -> Bed {
    let signer = PlatformSigner::generate("k1");
    let trust = trust(&signer, NOW + 3_600);
    let dir = tempfile::tempdir().unwrap();
    let policy = SitePolicy::open(dir.path()).unwrap();
    Bed {
        dir,
        signer,
        trust,
        policy,
    }
}

impl Bed {
    fn token(&self, version: u64, limits: Value) -> String {
        self.signer.site_policy(GW, version, NOW - 5, limits)
    }

    fn offer(&mut self, token: &str) -> Result<Accepted, PolicyRejected> {
        self.policy.accept(
            token.as_bytes(),
            Some(&self.trust),
            &self.signer.issuer,
            GW,
            &installer(),
            NOW,
        )
    }

    /// Offers `token` expecting a refusal, and checks that nothing changed: not in memory, not
    /// on disk. Returns the refusal's message.
    fn refused(&mut self, token: &str) -> String {
        let before = (self.policy.version(), self.policy.limits().to_vec());
        let on_disk = std::fs::read(self.dir.path().join(POLICY_FILE)).ok();
        let e = self.offer(token).unwrap_err();
        assert_eq!(
            (self.policy.version(), self.policy.limits().to_vec()),
            before
        );
        assert_eq!(
            std::fs::read(self.dir.path().join(POLICY_FILE)).ok(),
            on_disk
        );
        e.to_string()
    }
}

fn battery(limits: Value) -> Value {
    json!([{"deviceId": "bat-1", "deviceType": "battery", "limits": limits}])
}

#[test]
fn a_narrowing_policy_is_applied_stored_and_survives_a_reopen() {
    let mut b = bed();
    assert_eq!((b.policy.version(), b.policy.issued_at()), (0, 0));
    assert!(b.policy.limits().is_empty());
    let limits = json!([
        {"deviceId": "bat-1", "deviceType": "battery", "limits": {
            "min_backup_reserve": 30, "min_operating_reserve": 20, "max_operating_reserve": 80.5}},
        // Equal to the installer's limit is still inside it.
        {"deviceId": "ev-1", "deviceType": "vehicle", "limits": {
            "min_charge_limit": 50, "max_charge_limit": 90}},
        // A device the installer did not limit: any value in the key's range narrows it.
        {"deviceId": "bat-2", "deviceType": "battery", "limits": {"min_backup_reserve": 40}},
    ]);
    let token = b.token(4, limits);
    assert_eq!(b.offer(&token).unwrap(), Accepted::Applied { version: 4 });

    let expected = vec![
        DeviceLimits {
            min_backup_reserve: Some(30.0),
            min_operating_reserve: Some(20.0),
            max_operating_reserve: Some(80.5),
            ..DeviceLimits::new("bat-1", DeviceType::Battery)
        },
        DeviceLimits {
            min_charge_limit: Some(50.0),
            max_charge_limit: Some(90.0),
            ..DeviceLimits::new("ev-1", DeviceType::Vehicle)
        },
        DeviceLimits {
            min_backup_reserve: Some(40.0),
            ..DeviceLimits::new("bat-2", DeviceType::Battery)
        },
    ];
    assert_eq!(b.policy.version(), 4);
    assert_eq!(b.policy.issued_at(), NOW - 5);
    assert_eq!(b.policy.limits(), expected);

    let path = b.dir.path().join(POLICY_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let stored: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let members: Vec<&str> = stored
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(members, ["issuedAt", "limits", "token", "version"]);
    assert_eq!(stored["version"], 4);
    assert_eq!(stored["issuedAt"], NOW - 5);
    assert_eq!(stored["token"], token.as_str());
    assert_eq!(
        stored["limits"][0],
        json!({"deviceId": "bat-1", "deviceType": "battery", "limits": {
            "min_backup_reserve": 30, "min_operating_reserve": 20, "max_operating_reserve": 80.5}})
    );

    let mut reopened = SitePolicy::open(b.dir.path()).unwrap();
    assert_eq!(reopened.version(), 4);
    assert_eq!(reopened.issued_at(), NOW - 5);
    assert_eq!(reopened.limits(), expected);
    // The reopened policy still knows its token: the retained redelivery is not a refusal.
    let again = reopened.accept(
        token.as_bytes(),
        Some(&b.trust),
        &b.signer.issuer,
        GW,
        &installer(),
        NOW,
    );
    assert_eq!(again.unwrap(), Accepted::Unchanged);
}

#[test]
fn each_widening_refuses_the_whole_policy_naming_the_limit() {
    let mut b = bed();
    let narrow =
        json!({"deviceId": "ev-1", "deviceType": "vehicle", "limits": {"max_charge_limit": 80}});
    let cases = [
        (
            json!([narrow, {"deviceId": "bat-1", "deviceType": "battery", "limits": {"min_backup_reserve": 10}}]),
            "policy v4: min_backup_reserve = 10 % for bat-1 is below the installer's \
             min_backup_reserve = 20 %: a policy may only narrow the installer's limits",
        ),
        (
            battery(json!({"max_operating_reserve": 95})),
            "policy v4: max_operating_reserve = 95 % for bat-1 is above the installer's \
             max_operating_reserve = 90 %: a policy may only narrow the installer's limits",
        ),
        (
            battery(json!({"min_operating_reserve": 5})),
            "policy v4: min_operating_reserve = 5 % for bat-1 is below the installer's \
             min_operating_reserve = 10 %: a policy may only narrow the installer's limits",
        ),
        // A minimum above the installer's maximum, or a maximum below its minimum, would leave
        // no value at all.
        (
            battery(json!({"min_operating_reserve": 95})),
            "policy v4: min_operating_reserve = 95 % for bat-1 is above the installer's \
             max_operating_reserve = 90 %: a policy may only narrow the installer's limits",
        ),
        (
            battery(json!({"max_operating_reserve": 5})),
            "policy v4: max_operating_reserve = 5 % for bat-1 is below the installer's \
             min_operating_reserve = 10 %: a policy may only narrow the installer's limits",
        ),
        (
            json!([{"deviceId": "ev-1", "deviceType": "vehicle", "limits": {"max_charge_limit": 100}}]),
            "policy v4: max_charge_limit = 100 % for ev-1 is above the installer's \
             max_charge_limit = 90 %: a policy may only narrow the installer's limits",
        ),
        (
            json!([{"deviceId": "th-1", "deviceType": "thermostat", "limits": {"max_target_c": 30}}]),
            "policy v4: max_target_c = 30 °C for th-1 is above the installer's \
             max_target_c = 26 °C: a policy may only narrow the installer's limits",
        ),
        (
            json!([{"deviceId": "th-1", "deviceType": "thermostat", "limits": {"min_target_c": 15.5}}]),
            "policy v4: min_target_c = 15.5 °C for th-1 is below the installer's \
             min_target_c = 16 °C: a policy may only narrow the installer's limits",
        ),
        (
            json!([{"deviceId": "ev-1", "deviceType": "battery", "limits": {"min_backup_reserve": 50}}]),
            "policy v4: ev-1 is a battery in the policy but a vehicle in the installer's \
             limits: a policy may only narrow the installer's limits",
        ),
    ];
    for (limits, message) in cases {
        let token = b.token(4, limits);
        assert_eq!(b.refused(&token), message);
    }
    // After a narrowing policy is in force, a widening one still changes nothing.
    b.offer(&b.token(3, json!([narrow]))).unwrap();
    let token = b.token(4, battery(json!({"min_backup_reserve": 10})));
    assert!(b.refused(&token).contains("below the installer's"));
    assert_eq!(b.policy.version(), 3);
}

#[test]
fn the_retained_policy_redelivered_is_unchanged_and_older_or_equal_ones_are_not_newer() {
    let mut b = bed();
    let v5 = b.token(5, battery(json!({"min_backup_reserve": 30})));
    assert_eq!(b.offer(&v5).unwrap(), Accepted::Applied { version: 5 });
    assert_eq!(b.offer(&v5).unwrap(), Accepted::Unchanged);
    assert_eq!(b.offer(&v5).unwrap(), Accepted::Unchanged);

    // The same version with other contents is not the policy in force.
    let other = b.token(5, battery(json!({"min_backup_reserve": 40})));
    assert_eq!(
        b.refused(&other),
        "site policy version 5 is not newer than the stored version 5"
    );
    let older = b.token(4, battery(json!({"min_backup_reserve": 50})));
    assert_eq!(
        b.refused(&older),
        "site policy version 4 is not newer than the stored version 5"
    );
    // Version 0 is what a gateway without a policy holds.
    let mut fresh = bed();
    let zero = fresh.token(0, json!([]));
    assert_eq!(
        fresh.refused(&zero),
        "site policy version 0 is not newer than the stored version 0"
    );
}

#[test]
fn an_empty_policy_clears_the_limits_back_to_the_installers() {
    let mut b = bed();
    b.offer(&b.token(1, battery(json!({"min_backup_reserve": 30}))))
        .unwrap();
    assert_eq!(b.policy.limits().len(), 1);
    assert_eq!(
        b.offer(&b.token(2, json!([]))).unwrap(),
        Accepted::Applied { version: 2 }
    );
    assert!(b.policy.limits().is_empty());
    let reopened = SitePolicy::open(b.dir.path()).unwrap();
    assert_eq!(reopened.version(), 2);
    assert!(reopened.limits().is_empty());
}

#[test]
fn another_kind_of_token_is_refused_by_its_typ() {
    let mut b = bed();
    let claims = b.signer.claims(
        &ApiKey::server("key-1", "ws-1"),
        AttestedCommand::new(GW, "cmd-1", "agent:ping", json!({})),
        NOW,
        60,
    );
    let attestation = b.signer.attest(&claims);
    assert_eq!(
        b.refused(&attestation),
        r#"site policy signature: typ is not the expected "texture-site-policy+jws""#
    );
    let bundle = b.signer.trust_bundle(2, NOW, NOW + 60, &[]);
    assert!(b.refused(&bundle).starts_with("site policy signature: typ"));
}

#[test]
fn a_policy_for_another_gateway_or_from_another_issuer_is_refused() {
    let mut b = bed();
    let token = b.signer.site_policy("gw-2", 1, NOW, json!([]));
    assert_eq!(b.refused(&token), r#"site policy is for device "gw-2""#);

    let payload = |iss: &str, kid: &str| {
        json!({"iss": iss, "kid": kid, "deviceId": GW, "version": 1, "iat": NOW, "limits": []})
            .to_string()
    };
    for (iss, kid) in [("someone-else", "k1"), ("texture-platform", "k2")] {
        let token = b
            .signer
            .sign_site_policy_payload(payload(iss, kid).as_bytes());
        assert_eq!(
            b.refused(&token),
            "site policy payload is malformed: kid or iss does not match"
        );
    }
}

#[test]
fn malformed_claims_are_refused() {
    let mut b = bed();
    let sign = |b: &Bed, payload: &str| b.signer.sign_site_policy_payload(payload.as_bytes());
    let base = r#""iss":"texture-platform","kid":"k1","deviceId":"gw-1","version":1,"iat":1"#;
    let cases = [
        (format!(r#"{{{base},"limits":[],"exp":2}}"#), "unknown field `exp`"),
        (format!(r#"{{{base}}}"#), "missing field `limits`"),
        (
            format!(r#"{{{base},"limits":[{{"deviceId":"bat-1","deviceType":"battery"}}]}}"#),
            "missing field `limits`",
        ),
        (
            format!(r#"{{{base},"limits":[{{"deviceId":"bat-1","deviceType":"toaster","limits":{{}}}}]}}"#),
            "unknown variant `toaster`",
        ),
        (
            format!(r#"{{{base},"limits":[],"limits":[]}}"#),
            "repeats a member name within one object (object depth 1)",
        ),
        (
            format!(
                r#"{{{base},"limits":[{{"deviceId":"bat-1","deviceType":"battery","limits":{{"min_backup_reserve":30,"min_backup_reserve":10}}}}]}}"#
            ),
            "(object depth 3)",
        ),
        (
            r#"{"iss":"texture-platform","kid":"k1","deviceId":"gw-1","version":"1","iat":1,"limits":[]}"#.into(),
            "invalid type: string \"1\"",
        ),
    ];
    for (payload, detail) in cases {
        let message = b.refused(&sign(&b, &payload));
        assert!(
            message.starts_with("site policy payload is malformed: ") && message.contains(detail),
            "{payload}: {message}"
        );
    }
}

#[test]
fn an_entry_wrong_on_its_own_is_refused_naming_the_policy_entry() {
    let mut b = bed();
    let ok =
        json!({"deviceId": "bat-2", "deviceType": "battery", "limits": {"min_backup_reserve": 30}});
    let entry = |id: &str, kind: &str, limits: Value| json!([ok, {"deviceId": id, "deviceType": kind, "limits": limits}]);
    let cases = [
        (
            entry("bat-1", "battery", json!({"min_backup_reserve": 101})),
            "policy v2, entry #2 (bat-1): min_backup_reserve must be from 0 to 100, found 101",
        ),
        (
            entry("bat-1", "battery", json!({"min_backup_reserve": "30"})),
            "policy v2, entry #2 (bat-1): min_backup_reserve must be a number",
        ),
        (
            entry("bat-1", "battery", json!({"max_backup_reserve": 30})),
            r#"policy v2, entry #2 (bat-1): "max_backup_reserve" is not a limit key"#,
        ),
        (
            entry("bat-1", "battery", json!({"min_target_c": 18})),
            "policy v2, entry #2 (bat-1): min_target_c does not apply to a battery; a battery \
             takes min_backup_reserve, min_operating_reserve, max_operating_reserve",
        ),
        (
            entry(
                "bat-1",
                "battery",
                json!({"min_operating_reserve": 60, "max_operating_reserve": 40}),
            ),
            "policy v2, entry #2 (bat-1): min_operating_reserve (60) is above \
             max_operating_reserve (40)",
        ),
        (
            entry("bat-1", "battery", json!({})),
            "policy v2, entry #2 (bat-1): no limit given for this battery",
        ),
        (
            entry("ch-1", "charger", json!({"max_current_a": 100})),
            "policy v2, entry #2 (ch-1): max_current_a must be from 0 to 80, found 100",
        ),
        (
            entry("bat/1", "battery", json!({"min_backup_reserve": 30})),
            "policy v2, entry #2: device id contains '/'; only letters, digits, '.', '_' and \
             '-' are allowed",
        ),
        (
            entry("bat-2", "battery", json!({"min_backup_reserve": 50})),
            "policy v2, entry #2 (bat-2): the device is already limited by entry #1",
        ),
    ];
    for (limits, message) in cases {
        let token = b.token(2, limits);
        assert_eq!(b.refused(&token), message);
    }
}

#[test]
fn without_a_current_trust_bundle_nothing_is_accepted() {
    let mut b = bed();
    let token = b.token(1, json!([]));
    let e = b
        .policy
        .accept(token.as_bytes(), None, "texture-platform", GW, &[], NOW)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "no trust bundle yet: cannot verify the site policy"
    );
    let expired = trust(&b.signer, NOW);
    let e = b
        .policy
        .accept(
            token.as_bytes(),
            Some(&expired),
            "texture-platform",
            GW,
            &[],
            NOW,
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("the trust bundle expired at {NOW}: cannot verify the site policy")
    );
    // A key the bundle does not list, and a token over the size limit.
    let mut stranger = PlatformSigner::generate("k9");
    stranger.issuer = b.signer.issuer.clone();
    let token = stranger.site_policy(GW, 1, NOW, json!([]));
    assert_eq!(
        b.refused(&token),
        r#"site policy signature: no trusted key for kid "k9""#
    );
    let huge = "x".repeat(MAX_POLICY_BYTES + 1);
    assert_eq!(
        b.refused(&huge),
        "site policy signature: token is 16385 bytes, the limit is 16384"
    );
    assert_eq!(b.policy.version(), 0);
}

#[test]
fn a_failed_write_refuses_and_keeps_the_old_policy_in_memory_and_on_disk() {
    let mut b = bed();
    b.offer(&b.token(1, battery(json!({"min_backup_reserve": 30}))))
        .unwrap();
    // A directory where the temporary file goes: the write fails, even as root.
    std::fs::create_dir(b.dir.path().join(format!(".{POLICY_FILE}.tmp"))).unwrap();
    let token = b.token(2, battery(json!({"min_backup_reserve": 40})));
    let message = b.refused(&token);
    assert!(
        message.starts_with("could not store the site policy: "),
        "{message}"
    );
    assert_eq!(b.policy.version(), 1);
    assert_eq!(SitePolicy::open(b.dir.path()).unwrap().version(), 1);
}

#[test]
fn a_damaged_stored_policy_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(POLICY_FILE);
    std::fs::write(&path, b"{\"version\": 3").unwrap();
    let e = SitePolicy::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: not valid JSON", path.display())),
        "{e}"
    );

    let stored = json!({"version": 3, "issuedAt": 1, "token": "t", "limits": [
        {"deviceId": "bat-1", "deviceType": "battery", "limits": {"min_charge_limit": 30}}]});
    std::fs::write(&path, stored.to_string()).unwrap();
    let e = SitePolicy::open(dir.path()).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: policy v3, entry #1 (bat-1): min_charge_limit does not apply to a battery; a \
             battery takes min_backup_reserve, min_operating_reserve, max_operating_reserve",
            path.display()
        )
    );
}
