//! The metadata path router: never panics, and nothing it lets through to the allow-list
//! names an IAM or node-identity path, in any spelling.
#![no_main]

use kiam_agent::route::{Route, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Route::Other) = classify(path) {
        let lower = path.to_ascii_lowercase();
        let segments: Vec<&str> = lower.split('/').collect();
        assert!(!segments.contains(&"identity-credentials"), "{path:?}");
        assert!(
            !segments.windows(2).any(|w| w == ["meta-data", "iam"]),
            "{path:?}"
        );
        assert!(!segments.contains(&"..") && !segments.contains(&"."), "{path:?}");
        assert!(!lower.contains("%2e") && !lower.contains("%2f"), "{path:?}");
        if let Some(i) = segments.iter().position(|s| *s == "instance-identity") {
            assert!(
                segments.get(i + 1).is_none_or(|d| d.is_empty() || *d == "document"),
                "{path:?}"
            );
        }
    }
});
