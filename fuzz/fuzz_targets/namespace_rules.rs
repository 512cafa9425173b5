//! Namespace rules (kiam's regex, kube2iam's JSON list), role annotations and pass-through
//! rules: parsing and checking arbitrary input never panics, and an invalid rule never
//! permits.
#![no_main]

use kiam_server::policy::{BaseArn, Denied, NamespaceRules, PassThroughRule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (permitted, allowed, role) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let _ = PassThroughRule::parse(&text);
    let base = BaseArn::parse("123456789012").expect("base");
    let Ok(role) = base.resolve(role) else {
        return;
    };
    let rules = NamespaceRules::parse(
        Some(permitted).filter(|p| !p.is_empty()),
        Some(allowed).filter(|a| !a.is_empty()),
    );
    let verdict = rules.check("ns", &role, &base);
    let regex_broken = !permitted.is_empty()
        && regex::Regex::new(&format!("^(?:{permitted})$")).is_err();
    if regex_broken {
        assert!(matches!(verdict, Err(Denied::InvalidRule { .. })), "{verdict:?}");
    }
});
