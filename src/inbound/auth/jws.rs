//! JWS compact serialization with EdDSA over Ed25519 (RFC 7515, RFC 8037), pinned down hard.
//!
//! Why JWS: any platform language signs it with a stock library, and the signature covers the
//! exact bytes on the wire (`BASE64URL(header) "." BASE64URL(payload)`), so there is no
//! canonicalisation step for two implementations to disagree on.
//!
//! What "pinned down" means here, each rule closing a known JWS pitfall:
//! - the token is size-checked *before* any decoding or parsing;
//! - `alg` must be exactly `EdDSA` (no `none`, no HMAC confusion); `typ` must be the one expected
//!   for the message kind, so a trust bundle can never pass as a command or vice versa;
//! - the header may carry only `alg`, `kid` and `typ`: `crit`, `jwk`, `jku`, `x5u` and anything
//!   else are refused rather than ignored, so no header can point verification elsewhere;
//! - base64url must be unpadded and canonical (no stray trailing bits), so one token has exactly
//!   one encoding;
//! - the signature is checked with `verify_strict`, which rejects small-order keys and
//!   non-canonical signatures (no malleability);
//! - a JSON payload in which any object, at any depth, repeats a member name is refused, so no
//!   two JSON parsers (ours last-wins, an auditor's first-wins) can read one signed payload two
//!   ways;
//! - no error message repeats bytes from the token: they are unverified and may hold terminal
//!   escapes, and the messages end up in logs, in command refusals published to the platform and
//!   on the terminal of `texture-agent pair`.

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The only accepted `alg`.
pub const ALG: &str = "EdDSA";

/// The protected header. Unknown members are refused (see module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    pub typ: String,
}

/// Why a token was rejected. All of these mean "not signed by a key we trust", or (for
/// [`JwsError::RepeatedMember`]) signed but ambiguous.
///
/// The `Display` of every variant is safe to show anywhere: it never contains bytes from the
/// token. The fields keep what was found for code that matches on it (tests, metrics); print
/// them only through `Debug`, which escapes control characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error("token is {len} bytes, the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("not a JWS compact serialization (expected three base64url parts)")]
    NotCompact,
    #[error("{part} is not canonical unpadded base64url")]
    Base64 { part: &'static str },
    /// What is wrong with the header, in fixed words (never the header's own text).
    #[error("header is not a JSON object with only alg, kid and typ: {0}")]
    Header(&'static str),
    /// The `alg` found (unverified; not shown).
    #[error("alg is not allowed; only EdDSA")]
    Algorithm(String),
    /// The `typ` found (unverified; not shown) and the one expected.
    #[error("typ is not the expected {expected:?}")]
    Type {
        found: String,
        expected: &'static str,
    },
    /// The header's `kid` (unverified; shown only if it is a well-formed key id).
    #[error("{}", UnknownKid(.0.as_deref()))]
    UnknownKey(Option<String>),
    #[error("signature is not 64 bytes")]
    SignatureLength,
    #[error("signature does not verify")]
    BadSignature,
    /// The signature verified, but an object of the JSON payload repeats a member name.
    /// `depth` counts the objects enclosing the repeated member: 1 for the top level.
    #[error("payload repeats a member name within one object (object depth {depth})")]
    RepeatedMember { depth: usize },
}

/// Shows an unknown `kid` only if it is a plain key id, so no unverified text reaches a message.
struct UnknownKid<'a>(Option<&'a str>);

impl fmt::Display for UnknownKid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("the header has no kid; no trusted key to check it with"),
            Some(kid) if super::is_valid_command_id(kid) => {
                write!(f, "no trusted key for kid {kid:?}")
            }
            Some(_) => f.write_str(
                "no trusted key for the header's kid (not shown: not a well-formed key id)",
            ),
        }
    }
}

/// A token whose signature verified: its header and decoded payload.
#[derive(Debug, Clone)]
pub struct Verified {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// Verifies `token` and returns its payload.
///
/// `key_for` maps the header's `kid` to a trusted key; it sees only the kid, after the algorithm
/// and type have been checked, so a lookup is never attempted for a token we would refuse anyway.
pub fn verify<'k>(
    token: &[u8],
    max_len: usize,
    expected_typ: &'static str,
    key_for: impl FnOnce(Option<&str>) -> Option<&'k VerifyingKey>,
) -> Result<Verified, JwsError> {
    if token.len() > max_len {
        return Err(JwsError::TooLarge {
            len: token.len(),
            max: max_len,
        });
    }
    let mut parts = token.split(|&b| b == b'.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwsError::NotCompact);
    };
    let decode = |part: &'static str, text: &[u8]| {
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| JwsError::Base64 { part })
    };
    let header = parse_header(&decode("header", h64)?).map_err(JwsError::Header)?;
    if header.alg != ALG {
        return Err(JwsError::Algorithm(header.alg));
    }
    if header.typ != expected_typ {
        return Err(JwsError::Type {
            found: header.typ,
            expected: expected_typ,
        });
    }
    let signature: [u8; 64] = decode("signature", s64)?
        .try_into()
        .map_err(|_| JwsError::SignatureLength)?;
    let key =
        key_for(header.kid.as_deref()).ok_or_else(|| JwsError::UnknownKey(header.kid.clone()))?;
    let signing_input = &token[..h64.len() + 1 + p64.len()];
    key.verify_strict(signing_input, &Signature::from_bytes(&signature))
        .map_err(|_| JwsError::BadSignature)?;
    let payload = decode("payload", p64)?;
    if let Some(depth) = repeated_member_depth(&payload) {
        return Err(JwsError::RepeatedMember { depth });
    }
    Ok(Verified { header, payload })
}

/// Parses the protected header: a JSON object with string members `alg` and `typ`, optionally
/// `kid` (a string or `null`), and nothing else, each once. The error is a fixed phrase: the
/// header is unverified, so none of its text may reach a message.
fn parse_header(json: &[u8]) -> Result<Header, &'static str> {
    struct HeaderVisitor<'a>(&'a Cell<Option<&'static str>>);

    impl<'de> Visitor<'de> for HeaderVisitor<'_> {
        type Value = Header;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
            let fail = |problem: &'static str| {
                self.0.set(Some(problem));
                de::Error::custom(problem)
            };
            let (mut alg, mut kid, mut typ) = (None, None, None);
            while let Some(name) = map.next_key::<String>()? {
                let slot = match name.as_str() {
                    "alg" => &mut alg,
                    "kid" => &mut kid,
                    "typ" => &mut typ,
                    _ => return Err(fail("it has another member")),
                };
                if slot.is_some() {
                    return Err(fail("it repeats a member"));
                }
                *slot = Some(map.next_value::<serde_json::Value>()?);
            }
            let text = |value: serde_json::Value| match value {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(fail("alg, kid and typ must be strings")),
            };
            let (Some(alg), Some(typ)) = (alg, typ) else {
                return Err(fail("alg or typ is missing"));
            };
            let kid = match kid {
                None | Some(serde_json::Value::Null) => None,
                Some(value) => Some(text(value)?),
            };
            Ok(Header {
                alg: text(alg)?,
                kid,
                typ: text(typ)?,
            })
        }
    }

    let problem = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(json);
    let parsed = de::Deserializer::deserialize_any(&mut de, HeaderVisitor(&problem))
        .and_then(|header| de.end().map(|()| header));
    parsed.map_err(|e| {
        problem.get().unwrap_or(match e.classify() {
            serde_json::error::Category::Data => "it is not a JSON object",
            _ => "it is not valid JSON",
        })
    })
}

/// The walk of [`repeated_member_depth`]: visits every value, remembering each object's
/// member names, and stops at the first repeat.
struct Scan<'a> {
    depth: usize,
    found: &'a Cell<Option<usize>>,
}

impl<'de> DeserializeSeed<'de> for Scan<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Scan {
                depth: self.depth,
                found: self.found,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        let mut names = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !names.insert(name) {
                self.found.set(Some(depth));
                return Err(de::Error::custom("repeated member"));
            }
            map.next_value_seed(Scan {
                depth,
                found: self.found,
            })?;
        }
        Ok(())
    }
}

/// If `json` is JSON and one of its objects, at any depth, repeats a member name: the depth of
/// that object (1 for the top level). `None` when no name repeats, and also when `json` is not
/// JSON at all, which the caller's own parser then refuses with its own reason.
///
/// Names are compared after unescaping, so `"a"` and `"\u0061"` are the same member. The walk
/// is bounded by serde_json's recursion limit (128 levels).
pub fn repeated_member_depth(json: &[u8]) -> Option<usize> {
    let found = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(json);
    let _ = Scan {
        depth: 0,
        found: &found,
    }
    .deserialize(&mut de);
    found.get()
}

/// The `jti` a token's payload claims, **without verifying anything**.
///
/// Only for addressing a reply that refuses a command *unread*, when the agent is too busy to
/// verify it (a shed command): the reply says "busy, retry" and nothing else, so a forged jti
/// gains its sender nothing. Never use it for a decision. `None` for anything that is not a
/// compact JWS with a JSON payload whose `jti` is a well-formed command id (check 16).
pub fn peek_jti(token: &[u8], max_len: usize) -> Option<String> {
    if token.len() > max_len {
        return None;
    }
    let mut parts = token.split(|&b| b == b'.');
    let (Some(_), Some(p64), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    #[derive(serde::Deserialize)]
    struct Jti {
        jti: String,
    }
    let payload = URL_SAFE_NO_PAD.decode(p64).ok()?;
    let claims: Jti = serde_json::from_slice(&payload).ok()?;
    super::is_valid_command_id(&claims.jti).then_some(claims.jti)
}

/// Signs `payload` as a compact JWS. The platform's side of [`verify`]; see `crate::sim::platform`.
pub fn sign(key: &SigningKey, kid: Option<&str>, typ: &str, payload: &[u8]) -> String {
    let header = Header {
        alg: ALG.to_string(),
        kid: kid.map(str::to_owned),
        typ: typ.to_string(),
    };
    let mut token = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("header serialises"));
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(payload));
    let signature = key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    token
}

/// Decodes a pinned Ed25519 public key (32 bytes, unpadded base64url), refusing weak keys.
///
/// A small-order ("weak") key would let anyone produce signatures that verify under it, so it is
/// refused at load time rather than trusted.
pub fn public_key_from_base64(text: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = URL_SAFE_NO_PAD
        .decode(text.trim())
        .map_err(|_| "not unpadded base64url".to_string())?
        .try_into()
        .map_err(|_| "not 32 bytes".to_string())?;
    let key =
        VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 point".to_string())?;
    if key.is_weak() {
        return Err("a weak (small-order) key".to_string());
    }
    Ok(key)
}

/// Encodes a public key the way [`public_key_from_base64`] reads it.
pub fn public_key_to_base64(key: &VerifyingKey) -> String {
    URL_SAFE_NO_PAD.encode(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYP: &str = "texture-command+jws";

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn encode_header(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    /// A token with an arbitrary header, correctly signed by `k`.
    fn with_header(k: &SigningKey, header_json: &str) -> String {
        let mut t = encode_header(header_json);
        t.push('.');
        t.push_str(&URL_SAFE_NO_PAD.encode(b"{}"));
        let sig = k.sign(t.as_bytes());
        t.push('.');
        t.push_str(&URL_SAFE_NO_PAD.encode(sig.to_bytes()));
        t
    }

    fn check(token: &str, k: &SigningKey) -> Result<Verified, JwsError> {
        let vk = k.verifying_key();
        verify(token.as_bytes(), 8192, TYP, |_| Some(&vk))
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        let t = sign(&k, Some("p1"), TYP, br#"{"a":1}"#);
        let v = check(&t, &k).unwrap();
        assert_eq!(v.payload, br#"{"a":1}"#);
        assert_eq!(v.header.kid.as_deref(), Some("p1"));
    }

    #[test]
    fn only_eddsa_is_accepted() {
        let k = key(1);
        for alg in ["none", "HS256", "ES256", "RS256", "eddsa", "Ed25519"] {
            let t = with_header(&k, &format!(r#"{{"alg":"{alg}","typ":"{TYP}"}}"#));
            assert_eq!(
                check(&t, &k).unwrap_err(),
                JwsError::Algorithm(alg.into()),
                "{alg}"
            );
        }
    }

    #[test]
    fn unexpected_header_members_are_refused() {
        let k = key(1);
        for extra in [
            r#""crit":["exp"]"#,
            r#""jku":"https://x""#,
            r#""jwk":{}"#,
            r#""x5u":"x""#,
        ] {
            let t = with_header(&k, &format!(r#"{{"alg":"EdDSA","typ":"{TYP}",{extra}}}"#));
            assert!(matches!(check(&t, &k), Err(JwsError::Header(_))), "{extra}");
        }
    }

    /// A token over `payload`, correctly signed by `k`.
    fn over(k: &SigningKey, payload: &str) -> String {
        sign(k, Some("p1"), TYP, payload.as_bytes())
    }

    #[test]
    fn a_member_repeated_at_any_depth_of_the_payload_is_refused() {
        let k = key(1);
        for (payload, depth) in [
            (r#"{"a":1,"a":2}"#, 1),
            (r#"{"command":{"slug":"x","slug":"y"}}"#, 2),
            (r#"{"command":{"input":{"mode":"on","mode":"off"}}}"#, 3),
            (r#"{"command":{"input":{"p":{"w":1,"w":2}}}}"#, 4),
            (
                r#"{"command":{"input":{"list":[{"w":1},{"w":2,"w":3}]}}}"#,
                4,
            ),
            // The same name spelt two ways is the same member.
            (r#"{"command":{"input":{"a":1,"\u0061":2}}}"#, 3),
        ] {
            assert_eq!(
                check(&over(&k, payload), &k).unwrap_err(),
                JwsError::RepeatedMember { depth },
                "{payload}"
            );
        }
    }

    #[test]
    fn a_name_used_once_per_object_is_not_a_repeat() {
        let k = key(1);
        let payload = r#"{"a":{"a":{"a":1}},"b":[{"a":1},{"a":2}],"c":[],"d":{}}"#;
        assert_eq!(
            check(&over(&k, payload), &k).unwrap().payload,
            payload.as_bytes()
        );
        // Not JSON at all: left to the caller's parser, which refuses it with its own reason.
        assert!(check(&over(&k, "not json"), &k).is_ok());
    }

    #[test]
    fn a_member_repeated_in_the_header_is_refused() {
        let k = key(1);
        let t = with_header(
            &k,
            &format!(r#"{{"alg":"EdDSA","typ":"{TYP}","typ":"{TYP}"}}"#),
        );
        assert_eq!(
            check(&t, &k).unwrap_err(),
            JwsError::Header("it repeats a member")
        );
    }

    /// Every control character a terminal acts on: C0 (ESC, BEL, CR, LF), DEL, C1 (CSI U+009B)
    /// and a bidi override.
    fn has_control(text: &str) -> bool {
        text.chars().any(|c| {
            c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
    }

    #[test]
    fn no_error_message_repeats_unverified_header_text() {
        let k = key(1);
        let evil = r"\u001b[2J\u001b[Hpaired to mallory (binding version 9)\r\n\u009b31m\u202e";
        let headers = [
            format!(r#"{{"alg":"EdDSA","typ":"{TYP}","{evil}":1}}"#),
            format!(r#"{{"alg":"{evil}","typ":"{TYP}"}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"{evil}"}}"#),
            format!(r#"{{"alg":"EdDSA","kid":"{evil}","typ":"{TYP}"}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"{TYP}","kid":["{evil}"]}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"{TYP}"}} "{evil}""#),
            format!(r#"["{evil}"]"#),
            format!(r#""{evil}"#),
        ];
        for header in headers {
            let t = with_header(&k, &header);
            // No key for any kid, so the kid case fails at the lookup.
            let e = verify(t.as_bytes(), 8192, TYP, |_| None).unwrap_err();
            let message = e.to_string();
            assert!(!has_control(&message), "{header}: {message:?}");
            assert!(!message.contains("mallory"), "{header}: {message:?}");
        }
    }

    #[test]
    fn a_well_formed_unknown_kid_is_named_and_a_missing_one_said_so() {
        let k = key(1);
        let t = sign(&k, Some("platform-2026-01"), TYP, b"{}");
        let e = verify(t.as_bytes(), 8192, TYP, |_| None).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"no trusted key for kid "platform-2026-01""#
        );
        let t = with_header(
            &k,
            &format!(r#"{{"alg":"EdDSA","kid":null,"typ":"{TYP}"}}"#),
        );
        let e = verify(t.as_bytes(), 8192, TYP, |_| None).unwrap_err();
        assert_eq!(e, JwsError::UnknownKey(None));
    }

    #[test]
    fn wrong_typ_is_refused() {
        let k = key(1);
        let t = sign(&k, None, "texture-trust-bundle+jws", b"{}");
        assert!(matches!(check(&t, &k), Err(JwsError::Type { .. })));
    }

    #[test]
    fn oversized_token_is_refused_before_parsing() {
        let k = key(1);
        let junk = vec![b'!'; 8193];
        let vk = k.verifying_key();
        let e = verify(&junk, 8192, TYP, |_| Some(&vk)).unwrap_err();
        assert_eq!(
            e,
            JwsError::TooLarge {
                len: 8193,
                max: 8192
            }
        );
    }

    #[test]
    fn another_keys_signature_is_refused() {
        let t = sign(&key(1), None, TYP, b"{}");
        assert_eq!(check(&t, &key(2)).unwrap_err(), JwsError::BadSignature);
    }

    #[test]
    fn padding_and_extra_parts_are_refused() {
        let k = key(1);
        let t = sign(&k, None, TYP, b"{}");
        assert_eq!(
            check(&format!("{t}."), &k).unwrap_err(),
            JwsError::NotCompact
        );
        assert_eq!(
            check(&format!("{t}=="), &k).unwrap_err(),
            JwsError::Base64 { part: "signature" }
        );
    }

    #[test]
    fn weak_and_malformed_public_keys_are_refused() {
        // The identity point, encoded: small order, so signatures under it are forgeable.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let text = URL_SAFE_NO_PAD.encode(identity);
        assert!(public_key_from_base64(&text).unwrap_err().contains("weak"));
        assert!(public_key_from_base64("abc").is_err());
        let good = key(3).verifying_key();
        assert_eq!(
            public_key_from_base64(&public_key_to_base64(&good)).unwrap(),
            good
        );
    }

    #[test]
    fn peek_jti_reads_the_claim_without_a_key_and_rejects_junk() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let token = sign(&key, Some("k1"), TYP, br#"{"jti":"cmd-1","other":1}"#);
        assert_eq!(peek_jti(token.as_bytes(), 8192).as_deref(), Some("cmd-1"));
        assert_eq!(peek_jti(token.as_bytes(), 10), None, "over the size limit");
        let long = sign(
            &key,
            None,
            TYP,
            format!(r#"{{"jti":"{}"}}"#, "x".repeat(200)).as_bytes(),
        );
        assert_eq!(peek_jti(long.as_bytes(), 8192), None, "jti too long");
        let odd = sign(&key, None, TYP, br#"{"jti":"cmd\n1"}"#);
        assert_eq!(peek_jti(odd.as_bytes(), 8192), None, "jti not a command id");
        for junk in ["", "a.b", "a.b.c.d", "e30.e30.", "x.!!!.y"] {
            assert_eq!(peek_jti(junk.as_bytes(), 8192), None, "{junk}");
        }
    }
}
