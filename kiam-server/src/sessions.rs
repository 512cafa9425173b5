//! How many distinct credential sessions a namespace may cause. Pods choose part of the cache
//! key themselves (`session-name`, `external-id` annotations): a namespace user creating pods
//! with unique values would make every server assume, prefetch and refresh a role per pod and
//! drive STS into account-wide throttling. Each namespace gets at most
//! `--max-sessions-per-namespace` distinct keys; the first ones in hold their places until no
//! pod uses them, later ones are refused (with an Event) instead of assumed.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use crate::{credentials::CacheKey, refusal::Refusal};

pub struct SessionBudget {
    max: usize,
    admitted: Mutex<HashMap<String, HashSet<CacheKey>>>,
}

impl SessionBudget {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            admitted: Mutex::new(HashMap::new()),
        }
    }

    /// Admits `key` for `namespace` if it already holds a place or one is free.
    pub fn admit(&self, namespace: &str, key: &CacheKey) -> Result<(), Refusal> {
        let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        let keys = admitted.entry(namespace.to_owned()).or_default();
        if keys.contains(key) {
            return Ok(());
        }
        if keys.len() >= self.max {
            return Err(Refusal::TooManySessions {
                namespace: namespace.to_owned(),
                max: self.max,
            });
        }
        keys.insert(key.clone());
        Ok(())
    }

    /// The keys to keep and refresh, given the keys each namespace's pods use: first the
    /// places of keys no longer used are freed, then each namespace keeps the keys its budget
    /// admits. Keys holding a place keep it; free places go to the others in the keys' own
    /// order, so which keys a full namespace keeps never depends on hashing.
    pub fn keys_in_use(&self, used: &HashMap<String, HashSet<CacheKey>>) -> HashSet<CacheKey> {
        self.retain(used);
        let mut namespaces: Vec<(&String, &HashSet<CacheKey>)> = used.iter().collect();
        namespaces.sort_by_key(|(namespace, _)| *namespace);
        let mut in_use = HashSet::new();
        for (namespace, keys) in namespaces {
            let mut keys: Vec<&CacheKey> = keys.iter().collect();
            keys.sort();
            for key in keys {
                if self.admit(namespace, key).is_ok() {
                    in_use.insert(key.clone());
                }
            }
        }
        in_use
    }

    /// Frees the places of keys no pod of their namespace uses any more.
    pub fn retain(&self, in_use: &HashMap<String, HashSet<CacheKey>>) {
        let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        admitted.retain(|namespace, keys| {
            match in_use.get(namespace) {
                Some(used) => keys.retain(|k| used.contains(k)),
                None => keys.clear(),
            }
            !keys.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Reason;

    fn key(session: &str) -> CacheKey {
        CacheKey {
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            external_id: None,
            session_name: session.into(),
            tags: Vec::new(),
        }
    }

    #[test]
    fn a_namespace_gets_at_most_max_distinct_sessions() {
        let budget = SessionBudget::new(2);
        assert!(budget.admit("team", &key("a")).is_ok());
        assert!(
            budget.admit("team", &key("a")).is_ok(),
            "the same key again"
        );
        assert!(budget.admit("team", &key("b")).is_ok());
        let refused = budget.admit("team", &key("c")).expect_err("over the bound");
        assert_eq!(refused.reason(), Reason::TooManySessions);
        // Other namespaces have their own bound.
        assert!(budget.admit("other", &key("c")).is_ok());
        // Once no pod uses "a", its place is free.
        let in_use = HashMap::from([("team".to_owned(), HashSet::from([key("b")]))]);
        budget.retain(&in_use);
        assert!(budget.admit("team", &key("c")).is_ok());
        assert!(
            budget.admit("other", &key("d")).is_ok(),
            "other: nothing in use, all free"
        );
    }

    #[test]
    fn keys_in_use_are_those_the_budget_admits_whatever_the_hash_order() {
        let used = |keys: &[&str]| {
            HashMap::from([(
                "team".to_owned(),
                keys.iter().map(|k| key(k)).collect::<HashSet<_>>(),
            )])
        };
        // Free places go to the keys in their order, whatever order the set yields.
        for order in [["c", "a", "b"], ["b", "c", "a"], ["a", "b", "c"]] {
            let budget = SessionBudget::new(2);
            assert_eq!(
                budget.keys_in_use(&used(&order)),
                HashSet::from([key("a"), key("b")]),
                "{order:?}"
            );
        }
        // A key holding its place keeps it against one that sorts first.
        let budget = SessionBudget::new(2);
        budget.admit("team", &key("y")).expect("free");
        budget.admit("team", &key("z")).expect("free");
        assert_eq!(
            budget.keys_in_use(&used(&["a", "y", "z"])),
            HashSet::from([key("y"), key("z")])
        );
        // Once "y" is no longer used, "a" takes its place.
        assert_eq!(
            budget.keys_in_use(&used(&["a", "z"])),
            HashSet::from([key("a"), key("z")])
        );
        assert!(budget.keys_in_use(&HashMap::new()).is_empty());
    }
}
