//! The per-container roles annotation (`iam.amazonaws.com/container-roles`), written by
//! whoever may create pods: parsing arbitrary input never panics, and whatever it accepts
//! names only valid containers, each with a non-empty role or none.
#![no_main]

use kiam_server::containers::ContainerRoles;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(roles) = ContainerRoles::parse(&text) else {
        return;
    };
    for (name, role) in &roles.0 {
        assert!(!name.is_empty() && name.len() <= 63, "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{name:?}"
        );
        if let Some(role) = role {
            assert!(!role.role.trim().is_empty(), "{role:?}");
        }
    }
});
