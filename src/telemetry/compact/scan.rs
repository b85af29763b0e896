//! Reads a stored point (the compact JSON the outbox holds, PROTOCOL 14.1) as the encoder
//! needs it: its `ts`, `deviceId`, kind, and its body as a flat list of events, borrowing every
//! name and string from the record.
//!
//! Why not `serde_json::Value`: building a `Value` allocates a map node, a key and a string for
//! every member of every point, and that was three quarters of the compact encoder's cost. The
//! events borrow instead; only a string with an escape (rare) is copied, and unescaped by
//! serde_json itself, so the two readings cannot differ.

use std::borrow::Cow;

/// A leaf's value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Leaf<'a> {
    Bool(bool),
    Str(Cow<'a, str>),
    /// A number written with a fraction or an exponent, below 10^12 in magnitude.
    Fraction(f64),
    Int(i64),
    /// Anything else, as its JSON text: an array, `null`, `{}`, a number the others cannot
    /// hold.
    Raw(&'a str),
}

/// The body, flattened: nested non-empty objects open and close around their members.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Event<'a> {
    Open(Cow<'a, str>),
    Close,
    Leaf(Cow<'a, str>, Leaf<'a>),
}

/// A stored point.
#[derive(Debug)]
pub(super) struct Scanned<'a> {
    pub(super) ts: u64,
    pub(super) device_id: Cow<'a, str>,
    pub(super) kind: Cow<'a, str>,
}

pub(super) type Error = &'static str;

/// Reads `text`, pushing its body's events onto `events` (cleared first).
pub(super) fn point<'a>(text: &'a [u8], events: &mut Vec<Event<'a>>) -> Result<Scanned<'a>, Error> {
    events.clear();
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8")?;
    let mut s = Scanner { text, at: 0 };
    s.expect(b'{')?;
    let (mut ts, mut device_id, mut kind) = (None, None, None);
    loop {
        let name = s.string()?;
        s.expect(b':')?;
        match name.as_ref() {
            "ts" => match s.value()? {
                Leaf::Int(t) if t >= 0 => ts = Some(t as u64),
                _ => return Err("ts is not a count of milliseconds"),
            },
            "deviceId" => match s.value()? {
                Leaf::Str(id) => device_id = Some(id),
                _ => return Err("deviceId is not a string"),
            },
            _ if kind.is_some() => return Err("more than one body"),
            _ => {
                s.expect(b'{')?;
                if s.peek() == Some(b'}') {
                    s.at += 1;
                } else {
                    s.members(events)?;
                }
                kind = Some(name);
            }
        }
        if !s.comma_or_end(b'}')? {
            break;
        }
    }
    if s.peek().is_some() {
        return Err("bytes after the point");
    }
    Ok(Scanned {
        ts: ts.ok_or("no ts")?,
        device_id: device_id.ok_or("no deviceId")?,
        kind: kind.ok_or("no body")?,
    })
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        while self.at < bytes.len() && bytes[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
        bytes.get(self.at).copied()
    }

    fn expect(&mut self, b: u8) -> Result<(), Error> {
        if self.peek() != Some(b) {
            return Err("unexpected character");
        }
        self.at += 1;
        Ok(())
    }

    /// After a member: true for `,` (another follows), false for `end`.
    fn comma_or_end(&mut self, end: u8) -> Result<bool, Error> {
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                Ok(true)
            }
            Some(b) if b == end => {
                self.at += 1;
                Ok(false)
            }
            _ => Err("expected , or the end of an object"),
        }
    }

    /// The members of an object whose `{` is read and which is not empty, through its `}`.
    fn members(&mut self, events: &mut Vec<Event<'a>>) -> Result<(), Error> {
        loop {
            let name = self.string()?;
            self.expect(b':')?;
            if self.peek() == Some(b'{') {
                let start = self.at;
                self.at += 1;
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    events.push(Event::Leaf(name, Leaf::Raw(&self.text[start..self.at])));
                } else {
                    events.push(Event::Open(name));
                    self.members(events)?;
                    events.push(Event::Close);
                }
            } else {
                let leaf = self.value()?;
                events.push(Event::Leaf(name, leaf));
            }
            if !self.comma_or_end(b'}')? {
                return Ok(());
            }
        }
    }

    /// A string token, unescaped.
    fn string(&mut self) -> Result<Cow<'a, str>, Error> {
        self.expect(b'"')?;
        let bytes = self.text.as_bytes();
        let start = self.at;
        let mut escaped = false;
        while let Some(&b) = bytes.get(self.at) {
            match b {
                b'"' => {
                    let inner = &self.text[start..self.at];
                    self.at += 1;
                    if !escaped {
                        return Ok(Cow::Borrowed(inner));
                    }
                    let quoted = &self.text[start - 1..self.at];
                    return serde_json::from_str::<String>(quoted)
                        .map(Cow::Owned)
                        .map_err(|_| "a bad escape");
                }
                b'\\' => {
                    escaped = true;
                    self.at += 2;
                }
                _ => self.at += 1,
            }
        }
        Err("an unterminated string")
    }

    /// A value that is not an object.
    fn value(&mut self) -> Result<Leaf<'a>, Error> {
        match self.peek().ok_or("a missing value")? {
            b'"' => Ok(Leaf::Str(self.string()?)),
            b't' => self.word("true", Leaf::Bool(true)),
            b'f' => self.word("false", Leaf::Bool(false)),
            b'n' => self.word("null", Leaf::Raw("null")),
            b'[' | b'{' => {
                let start = self.at;
                self.skip_nested()?;
                Ok(Leaf::Raw(&self.text[start..self.at]))
            }
            _ => self.number(),
        }
    }

    fn word(&mut self, word: &'static str, leaf: Leaf<'a>) -> Result<Leaf<'a>, Error> {
        if !self.text[self.at..].starts_with(word) {
            return Err("an unknown word");
        }
        self.at += word.len();
        Ok(leaf)
    }

    /// An array or object, through its closing bracket, strings and all.
    fn skip_nested(&mut self) -> Result<(), Error> {
        let bytes = self.text.as_bytes();
        let mut depth = 0usize;
        let mut in_string = false;
        while let Some(&b) = bytes.get(self.at) {
            self.at += 1;
            match (in_string, b) {
                (true, b'\\') => self.at += 1,
                (true, b'"') => in_string = false,
                (true, _) => {}
                (false, b'"') => in_string = true,
                (false, b'[' | b'{') => depth += 1,
                (false, b']' | b'}') => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                (false, _) => {}
            }
        }
        Err("an unterminated array")
    }

    /// A number token, read as serde_json reads it: a fraction or exponent makes it a float.
    fn number(&mut self) -> Result<Leaf<'a>, Error> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        while bytes
            .get(self.at)
            .is_some_and(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        {
            self.at += 1;
        }
        let token = &self.text[start..self.at];
        if token.is_empty() {
            return Err("an unexpected character");
        }
        if token.contains(['.', 'e', 'E']) {
            let x: f64 = token.parse().map_err(|_| "a bad number")?;
            return Ok(if x.abs() < 1e12 {
                Leaf::Fraction(x)
            } else {
                Leaf::Raw(token)
            });
        }
        Ok(match token.parse::<i64>() {
            Ok(i) => Leaf::Int(i),
            Err(_) => Leaf::Raw(token),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_reads_as_its_events_with_borrowed_names() {
        let text = br#"{"ts":5,"deviceId":"th-1","state":{"type":"thermostat","ambientTemperature":{"value":19.42,"unit":"C"},"x":{},"arr":[1,{"a":"]"}],"n":null,"b":true,"i":-3,"big":18446744073709551615,"e":"\u00e9\"","f":1e3}}"#;
        let mut events = Vec::new();
        let p = point(text, &mut events).unwrap();
        assert_eq!(
            (p.ts, p.device_id.as_ref(), p.kind.as_ref()),
            (5, "th-1", "state")
        );
        let leaf = |n: &'static str, l| Event::Leaf(Cow::Borrowed(n), l);
        assert_eq!(
            events,
            [
                leaf("type", Leaf::Str("thermostat".into())),
                Event::Open("ambientTemperature".into()),
                leaf("value", Leaf::Fraction(19.42)),
                leaf("unit", Leaf::Str("C".into())),
                Event::Close,
                leaf("x", Leaf::Raw("{}")),
                leaf("arr", Leaf::Raw(r#"[1,{"a":"]"}]"#)),
                leaf("n", Leaf::Raw("null")),
                leaf("b", Leaf::Bool(true)),
                leaf("i", Leaf::Int(-3)),
                leaf("big", Leaf::Raw("18446744073709551615")),
                leaf("e", Leaf::Str("é\"".into())),
                leaf("f", Leaf::Fraction(1000.0)),
            ]
        );
        assert!(matches!(
            &events[0],
            Event::Leaf(Cow::Borrowed(_), Leaf::Str(Cow::Borrowed(_)))
        ));
    }

    #[test]
    fn what_is_not_a_stored_point_is_an_error() {
        let mut events = Vec::new();
        for bad in [
            &br#"{"ts":1,"deviceId":"a","state":{},"health":{}}"#[..],
            br#"{"ts":-1,"deviceId":"a","state":{}}"#,
            br#"{"deviceId":"a","state":{}}"#,
            br#"{"ts":1,"deviceId":"a","state":{"x":"unterminated}}"#,
            br#"{"ts":1,"deviceId":"a","state":{"x":tru}}"#,
            br#"{"ts":1,"deviceId":"a","state":{}} trailing"#,
            b"",
        ] {
            assert!(
                point(bad, &mut events).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
