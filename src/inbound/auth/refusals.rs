//! Recent verified refusals, so a redelivered refused command gets the same answer.
//!
//! Refusals are kept apart from the replay journal on purpose. The journal's capacity is what
//! lets commands that *can* run be recorded before they run; callers with no right to command
//! this gateway (another workspace's server key, another user's scoped key, a connect key, a
//! revoked key) must not be able to spend it. This cache is in memory, bounded, and evicts its
//! oldest entry when full: forgetting a refusal is harmless, because the command never ran and a
//! redelivery is simply judged again.

use std::collections::{HashMap, VecDeque};

/// Refusals remembered at most; each holds one reply (a few hundred bytes).
pub const REFUSAL_CACHE_CAPACITY: usize = 256;

#[derive(Debug, Default)]
pub struct RefusalCache {
    replies: HashMap<String, Vec<u8>>,
    /// Command ids, oldest first.
    order: VecDeque<String>,
}

impl RefusalCache {
    pub fn get(&self, command_id: &str) -> Option<&[u8]> {
        self.replies.get(command_id).map(Vec::as_slice)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.replies.len()
    }

    /// Remembers the reply refusing `command_id`, evicting the oldest refusal when full.
    pub fn insert(&mut self, command_id: &str, reply: Vec<u8>) {
        if self.replies.contains_key(command_id) {
            return;
        }
        if self.order.len() >= REFUSAL_CACHE_CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.replies.remove(&oldest);
            }
        }
        self.order.push_back(command_id.to_owned());
        self.replies.insert(command_id.to_owned(), reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_evicts_the_oldest_refusal_first() {
        let mut cache = RefusalCache::default();
        for i in 0..REFUSAL_CACHE_CAPACITY + 1 {
            cache.insert(&format!("c{i}"), vec![i as u8]);
        }
        assert_eq!(cache.len(), REFUSAL_CACHE_CAPACITY);
        assert!(cache.get("c0").is_none());
        assert_eq!(cache.get("c1"), Some(&[1u8][..]));
        assert!(cache.get(&format!("c{REFUSAL_CACHE_CAPACITY}")).is_some());
    }

    #[test]
    fn the_first_reply_for_an_id_is_kept() {
        let mut cache = RefusalCache::default();
        cache.insert("c", b"first".to_vec());
        cache.insert("c", b"second".to_vec());
        assert_eq!(cache.get("c"), Some(&b"first"[..]));
        assert_eq!(cache.len(), 1);
    }
}
