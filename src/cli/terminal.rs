//! What may be shown on a terminal.
//!
//! Everything printed that came from the network or from the daemon (pairing events, refusal
//! reasons, the owner's reference id, the link's last error) goes through [`printable`] first:
//! `pair` is run as root on a terminal, and a terminal obeys escape sequences.

use std::borrow::Cow;

/// `text` with every character a terminal could act on written as an escape in Rust's form
/// (`\u{1b}`): the C0 controls (newline and tab included), DEL, the C1 controls U+0080 to
/// U+009F (among them U+009B, a one-character CSI), and the bidirectional marks, embeddings,
/// overrides and isolates (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069), which
/// can make a line read differently from what it holds. Anything else is kept, so names in any
/// script print as they are; borrowed when there is nothing to escape.
pub fn printable(text: &str) -> Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(
                c,
                '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            )
    }
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_escapes_every_character_a_terminal_acts_on() {
        let evil = "\u{1b}[2J\u{1b}[Hpaired to mallory\r\n\u{7}\u{7f}\u{9b}31m\u{85}\u{202e}x\u{2066}\u{200f}\u{61c}\t";
        let shown = printable(evil);
        assert_eq!(
            shown,
            "\\u{1b}[2J\\u{1b}[Hpaired to mallory\\u{d}\\u{a}\\u{7}\\u{7f}\\u{9b}31m\\u{85}\\u{202e}x\\u{2066}\\u{200f}\\u{61c}\\u{9}"
        );
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
    }

    #[test]
    fn printable_keeps_plain_text_of_any_script_borrowed() {
        for plain in [
            "user_42",
            "Zoë Müller",
            "用户",
            "gw-0001 (link: connected) …",
            "",
        ] {
            assert!(matches!(printable(plain), std::borrow::Cow::Borrowed(p) if p == plain));
        }
    }
}
