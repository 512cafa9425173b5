//! What the agent knows about pods' roles and credentials, asked from the servers and cached
//! per pod UID, so a request for credentials the agent holds needs no gRPC, and a server
//! outage or roll-out is invisible to pods while the held credentials stay valid. Entries are
//! keyed by pod UID (never shared between pods) and only served with at least the minimum
//! validity left.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::FutureExt as _;
use kiam_proto::{GetCredentialsRequest, GetPodRoleRequest};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::client::Servers;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// Listed under `iam/security-credentials/`.
    pub name: String,
    pub arn: String,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Creds {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration_unix: i64,
    pub last_updated_unix: i64,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds")
            .field("access_key_id", &self.access_key_id)
            .field("expiration_unix", &self.expiration_unix)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Creds {
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.expiration_unix - now_unix()).unwrap_or(0))
    }
}

pub struct Settings {
    pub node: String,
    /// Per-request deadline: below botocore's default 1 s metadata timeout.
    pub deadline: Duration,
    pub min_validity: Duration,
    /// How long a pod's role is trusted before asking again (annotation changes apply after
    /// at most this long).
    pub role_ttl: Duration,
}

struct RoleEntry {
    role: Role,
    fetched: Instant,
}

pub struct Upstream {
    servers: Option<Arc<Servers>>,
    settings: Settings,
    roles: RwLock<HashMap<String, RoleEntry>>,
    /// Keyed by pod UID and role ARN (names repeat across paths and accounts).
    creds: RwLock<HashMap<(String, String), Arc<Creds>>>,
    /// Background refreshes started, by key: at most one every `REFRESH_SPACING`.
    refreshing: std::sync::Mutex<HashMap<(String, String), Instant>>,
}

/// Minimum time between two background refreshes of one pod's credentials.
const REFRESH_SPACING: Duration = Duration::from_secs(30);

fn unavailable_or_late(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}

impl Upstream {
    pub fn new(servers: Option<Arc<Servers>>, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            servers,
            settings,
            roles: RwLock::new(HashMap::new()),
            creds: RwLock::new(HashMap::new()),
            refreshing: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// When a metadata request starting now must be answered (one deadline for all the calls
    /// a request makes).
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.settings.deadline
    }

    fn servers(&self) -> Result<&Arc<Servers>, Status> {
        self.servers
            .as_ref()
            .ok_or_else(|| Status::unavailable("this agent has no --server configured"))
    }

    /// The pod's role; a cached one while fresh, or while the servers cannot be reached.
    pub async fn role(&self, pod_uid: &str, deadline: Instant) -> Result<Role, Status> {
        let cached = {
            let roles = self.roles.read().unwrap_or_else(|e| e.into_inner());
            roles
                .get(pod_uid)
                .map(|e| (e.role.clone(), e.fetched.elapsed() < self.settings.role_ttl))
        };
        if let Some((role, true)) = &cached {
            return Ok(role.clone());
        }
        let request = GetPodRoleRequest {
            pod_uid: pod_uid.to_owned(),
            node_name: self.settings.node.clone(),
        };
        let answer = self
            .servers()?
            .call(deadline, move |mut client| {
                let request = request.clone();
                async move { client.get_pod_role(request).await.map(|r| r.into_inner()) }.boxed()
            })
            .await;
        match answer {
            Ok(answer) => {
                let role = Role {
                    name: answer.role_name,
                    arn: answer.role_arn,
                };
                if cached.as_ref().is_some_and(|(old, _)| old.arn != role.arn) {
                    // The annotation changed: nothing held for the old role may be served.
                    self.forget(pod_uid);
                }
                let entry = RoleEntry {
                    role: role.clone(),
                    fetched: Instant::now(),
                };
                self.roles
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(pod_uid.to_owned(), entry);
                Ok(role)
            }
            Err(status) if unavailable_or_late(&status) => match cached {
                Some((role, _)) => Ok(role),
                None => Err(status),
            },
            Err(status) => {
                // The servers said no (deleted, forbidden, no annotation): forget what we had.
                self.forget(pod_uid);
                Err(status)
            }
        }
    }

    fn forget(&self, pod_uid: &str) {
        self.roles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod_uid);
        self.creds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(uid, _), _| uid != pod_uid);
    }

    fn refresh_below(&self) -> Duration {
        self.settings.min_validity + Duration::from_secs(600)
    }

    fn cached_creds(&self, pod_uid: &str, role: &Role) -> Option<Arc<Creds>> {
        self.creds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pod_uid.to_owned(), role.arn.clone()))
            .cloned()
    }

    async fn fetch(
        &self,
        pod_uid: &str,
        role: &Role,
        deadline: Instant,
    ) -> Result<Arc<Creds>, Status> {
        let request = GetCredentialsRequest {
            pod_uid: pod_uid.to_owned(),
            node_name: self.settings.node.clone(),
            role_name: role.name.clone(),
        };
        let answer = self
            .servers()?
            .call(deadline, move |mut client| {
                let request = request.clone();
                async move {
                    client
                        .get_credentials(request)
                        .await
                        .map(|r| r.into_inner())
                }
                .boxed()
            })
            .await?;
        if answer.role_arn != role.arn {
            // The pod's role changed between the two calls: the next request starts over.
            self.forget(pod_uid);
            return Err(Status::unavailable(format!(
                "the pod's role changed to {} while asking; retry",
                answer.role_arn
            )));
        }
        let creds = Arc::new(Creds {
            access_key_id: answer.access_key_id,
            secret_access_key: answer.secret_access_key,
            session_token: answer.session_token,
            expiration_unix: answer.expiration_unix,
            last_updated_unix: answer.last_updated_unix,
        });
        self.creds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((pod_uid.to_owned(), role.arn.clone()), creds.clone());
        Ok(creds)
    }

    /// Claims the one background refresh allowed for `key` now.
    fn claim_refresh(&self, key: (String, String)) -> bool {
        let mut refreshing = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        refreshing.retain(|_, at| now.duration_since(*at) < REFRESH_SPACING);
        match refreshing.contains_key(&key) {
            true => false,
            false => {
                refreshing.insert(key, now);
                true
            }
        }
    }

    /// Credentials for the pod's role named `role`, with at least the minimum validity left.
    pub async fn credentials(
        self: &Arc<Self>,
        pod_uid: &str,
        role: &str,
        deadline: Instant,
    ) -> Result<Arc<Creds>, Status> {
        let current = self.role(pod_uid, deadline).await?;
        if current.name != role {
            return Err(Status::not_found(format!(
                "this pod's role is {}, not {role}",
                current.name
            )));
        }
        if let Some(creds) = self.cached_creds(pod_uid, &current) {
            let left = creds.remaining();
            if left >= self.refresh_below() {
                return Ok(creds);
            }
            if left >= self.settings.min_validity {
                if self.claim_refresh((pod_uid.to_owned(), current.arn.clone())) {
                    let (this, uid, role) = (self.clone(), pod_uid.to_owned(), current.clone());
                    tokio::spawn(async move {
                        let deadline = this.deadline();
                        if let Err(status) = this.fetch(&uid, &role, deadline).await {
                            tracing::warn!(pod_uid = %uid, role = %role.arn, error = %status.message(), "background refresh failed");
                        }
                    });
                }
                return Ok(creds);
            }
        }
        match self.fetch(pod_uid, &current, deadline).await {
            Ok(creds) if creds.remaining() >= self.settings.min_validity => Ok(creds),
            Ok(creds) => Err(Status::unavailable(format!(
                "the servers' credentials have only {}s left",
                creds.remaining().as_secs()
            ))),
            Err(status) => Err(status),
        }
    }

    /// Drops what can no longer be served.
    pub fn prune(&self) {
        let min = self.settings.min_validity;
        self.creds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, c| c.remaining() >= min);
        let ttl = self.settings.role_ttl * 60;
        self.roles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, r| r.fetched.elapsed() < ttl);
    }
}
