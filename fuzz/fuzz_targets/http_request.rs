//! A whole HTTP/1.1 connection through the agent's service, bytes as a pod could send them:
//! never panics, always ends (the idle timeout bounds a half-sent request).
#![no_main]

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use kiam_agent::{
    api::serve_connection,
    identity::{PodCgroup, QosClass},
    imds::Imds,
    metrics::Metrics,
    resolver::Caller,
    token::Tokens,
    upstream::{Settings, SystemClock, Upstream},
};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct World {
    runtime: tokio::runtime::Runtime,
    imds: Arc<Imds>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let upstream = Upstream::new(
            None,
            Arc::new(SystemClock),
            Settings {
                node: "node".into(),
                deadline: Duration::from_millis(10),
                min_validity: Duration::from_secs(1800),
                role_ttl: Duration::from_secs(10),
                refusal_ttl: Duration::from_secs(1),
                refresh_wait: Duration::from_millis(10),
            },
        );
        let imds = Arc::new(Imds {
            log_budget: Default::default(),
            forward_rate: kiam_agent::rate::PodRate::new(20),
            tokens: Tokens::random().expect("key"),
            upstream,
            allow: regex::Regex::new(kiam_agent::config::DEFAULT_ALLOW_ROUTE).expect("regex"),
            allow_user_data: false,
            require_v2: false,
            forwarder: None,
            metrics: Arc::new(Metrics::default()),
        });
        World { runtime, imds }
    })
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let caller = Caller::for_pod(PodCgroup {
        pod_uid: "0f6a8c2e-3b1d-4e5f-9a7b-1c2d3e4f5a6b".into(),
        static_pod: false,
        qos: QosClass::Burstable,
        container_id: None,
        runtime: None,
    });
    let bytes = data.to_vec();
    world.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = serve_connection(
            server,
            Ok(caller),
            world.imds.clone(),
            Duration::from_millis(200),
        );
        let talking = async move {
            let _ = client.write_all(&bytes).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
        };
        let finished =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(serving, talking) })
                .await;
        assert!(finished.is_ok(), "the connection did not end");
    });
});
