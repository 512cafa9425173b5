//! IMDSv2 tokens: checking arbitrary input never panics and never accepts anything but a
//! token issued to that pod; an issued token is accepted for its pod only.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use kiam_agent::token::Tokens;
use libfuzzer_sys::fuzz_target;

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(|| Tokens::random().expect("key"))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (pod, presented) = text.split_once('\n').unwrap_or((&text, ""));
    let tokens = tokens();
    let issued = tokens.issue(pod, Duration::from_secs(60));
    assert_eq!(tokens.check(&issued, pod), Ok(()));
    if !pod.is_empty() {
        assert!(tokens.check(&issued, &format!("{pod}x")).is_err());
    }
    if tokens.check(presented, pod).is_ok() {
        assert_eq!(presented, issued, "a token kiam never issued was accepted");
    }
});
