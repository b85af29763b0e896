//! The regular expressions of the catalog's JSON Schemas, matched without a regex crate so the
//! test's reading of a pattern is independent of any engine the agent might use.

/// A backtracking matcher for the regular expressions of the catalog's schemas: anchored
/// (`^...$`), with literals, `\.`, `[a-z]` classes, groups, `|`, `?`, `+` and `*`.
#[derive(Debug, Clone)]
pub enum Regex {
    /// One character from these inclusive ranges.
    Class(Vec<(char, char)>),
    Seq(Vec<Regex>),
    Alt(Vec<Regex>),
    Repeat {
        inner: Box<Regex>,
        at_least_one: bool,
        at_most_one: bool,
    },
}

impl Regex {
    pub fn parse(pattern: &str) -> Regex {
        let body = pattern
            .strip_prefix('^')
            .and_then(|p| p.strip_suffix('$'))
            .expect("schema patterns are anchored at both ends");
        let chars: Vec<char> = body.chars().collect();
        let mut at = 0;
        let regex = Regex::parse_alt(&chars, &mut at);
        assert_eq!(at, chars.len(), "unbalanced pattern {pattern}");
        regex
    }

    fn parse_alt(chars: &[char], at: &mut usize) -> Regex {
        let mut options = vec![Regex::parse_seq(chars, at)];
        while chars.get(*at) == Some(&'|') {
            *at += 1;
            options.push(Regex::parse_seq(chars, at));
        }
        Regex::Alt(options)
    }

    fn parse_seq(chars: &[char], at: &mut usize) -> Regex {
        let mut items = Vec::new();
        while let Some(&c) = chars.get(*at) {
            *at += 1;
            let atom = match c {
                '|' | ')' => {
                    *at -= 1;
                    break;
                }
                '(' => {
                    let group = Regex::parse_alt(chars, at);
                    assert_eq!(chars.get(*at), Some(&')'));
                    *at += 1;
                    group
                }
                '[' => {
                    let mut ranges = Vec::new();
                    while chars[*at] != ']' {
                        let lo = chars[*at];
                        if chars[*at + 1] == '-' {
                            ranges.push((lo, chars[*at + 2]));
                            *at += 3;
                        } else {
                            ranges.push((lo, lo));
                            *at += 1;
                        }
                    }
                    *at += 1;
                    Regex::Class(ranges)
                }
                '\\' => {
                    let escaped = chars[*at];
                    assert!(escaped.is_ascii_punctuation(), "escape \\{escaped}");
                    *at += 1;
                    Regex::Class(vec![(escaped, escaped)])
                }
                '.' | '{' | '^' | '$' => panic!("unsupported `{c}`"),
                literal => Regex::Class(vec![(literal, literal)]),
            };
            let repeat = |at_least_one, at_most_one| Regex::Repeat {
                inner: Box::new(atom.clone()),
                at_least_one,
                at_most_one,
            };
            let item = match chars.get(*at) {
                Some('?') => repeat(false, true),
                Some('+') => repeat(true, false),
                Some('*') => repeat(false, false),
                _ => {
                    items.push(atom);
                    continue;
                }
            };
            *at += 1;
            items.push(item);
        }
        Regex::Seq(items)
    }

    pub fn matches(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        self.match_at(&chars, 0, &mut |end| end == chars.len())
    }

    /// Whether `self` matches `s` from `at` to some end for which `then` holds.
    fn match_at(&self, s: &[char], at: usize, then: &mut dyn FnMut(usize) -> bool) -> bool {
        match self {
            Regex::Class(ranges) => {
                at < s.len()
                    && ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&s[at]))
                    && then(at + 1)
            }
            Regex::Seq(items) => match items.split_first() {
                None => then(at),
                Some((first, rest)) => {
                    let rest = Regex::Seq(rest.to_vec());
                    first.match_at(s, at, &mut |next| rest.match_at(s, next, then))
                }
            },
            Regex::Alt(options) => options.iter().any(|option| option.match_at(s, at, then)),
            Regex::Repeat {
                inner,
                at_least_one,
                at_most_one,
            } => {
                let more = !*at_most_one;
                let once = |at: usize, then: &mut dyn FnMut(usize) -> bool| {
                    inner.match_at(s, at, &mut |next| {
                        // Going round again only after progress keeps the recursion finite.
                        then(next)
                            || (more
                                && next > at
                                && Regex::Repeat {
                                    inner: inner.clone(),
                                    at_least_one: false,
                                    at_most_one: false,
                                }
                                .match_at(s, next, then))
                    })
                };
                if *at_least_one {
                    once(at, then)
                } else {
                    then(at) || once(at, then)
                }
            }
        }
    }
}
