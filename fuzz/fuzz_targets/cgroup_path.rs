//! The kubelet cgroup path parser: never panics, and a pod it finds is named on the path.
#![no_main]

use kiam_agent::identity::parse_cgroup_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(pod) = parse_cgroup_path(path) {
        let uid = &pod.pod_uid;
        assert_eq!(uid.len(), 36, "{path:?} → {uid}");
        assert!(
            path.contains(uid.as_str()) || path.contains(&uid.replace('-', "_")),
            "{path:?} → {uid}"
        );
        if let Some(container) = &pod.container_id {
            assert!(path.contains(container.as_str()), "{path:?} → {container}");
        }
    }
});
