//! The metadata path router: never panics, and nothing it lets through to the allow-list
//! names an IAM, node-identity or user-data path, in any spelling, nor holds a
//! percent-encoding a decoding server would read as another name.
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
        assert!(!segments.contains(&"user-data"), "{path:?}");
        assert!(path.bytes().all(|b| (0x20..0x7f).contains(&b)), "{path:?}");
        let decoded_names: Vec<u8> = lower
            .split('%')
            .skip(1)
            .filter_map(|rest| rest.get(..2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect();
        assert!(
            decoded_names
                .iter()
                .all(|b| !b.is_ascii_alphanumeric() && !b"-._~/\\".contains(b)),
            "{path:?}"
        );
        if let Some(i) = segments.iter().position(|s| *s == "instance-identity") {
            assert!(
                segments.get(i + 1).is_none_or(|d| d.is_empty() || *d == "document"),
                "{path:?}"
            );
        }
    }
});
