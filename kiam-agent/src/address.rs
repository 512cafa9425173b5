//! A link-local agent address (`--agent-ip 169.254.x.y`): one /32 on the node's loopback,
//! added by the agent when missing. Pods then reach the agent at an address no Service can
//! claim (the API server refuses link-local `externalIPs`), so a DNAT rule for the node's
//! address, as kube-proxy installs for a Service with `externalIPs`, cannot capture their
//! metadata traffic.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;

/// The loopback interface's index, the same in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{action} {addr}/32 on lo (the agent needs CAP_NET_ADMIN)")]
    Netlink {
        action: &'static str,
        addr: Ipv4Addr,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Maps a netlink failure while `action` on `addr` to an [`AddressError`].
fn netlink_error(
    action: &'static str,
    addr: Ipv4Addr,
) -> impl FnOnce(rtnetlink::Error) -> AddressError {
    move |source| AddressError::Netlink {
        action,
        addr,
        source,
    }
}

/// `169.254.0.0/16`.
pub fn is_link_local(addr: Ipv4Addr) -> bool {
    addr.is_link_local()
}

fn handle() -> Result<rtnetlink::Handle, AddressError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(AddressError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Adds `addr/32` to `lo` unless an interface of this network namespace has it. Returns
/// whether it added it.
pub async fn ensure_on_loopback(addr: Ipv4Addr) -> Result<bool, AddressError> {
    let handle = handle()?;
    let err = |action| netlink_error(action, addr);
    let present = handle
        .address()
        .get()
        .set_address_filter(IpAddr::V4(addr))
        .execute()
        .try_next()
        .await
        .map_err(err("looking up"))?
        .is_some();
    if present {
        return Ok(false);
    }
    handle
        .address()
        .add(LOOPBACK_INDEX, IpAddr::V4(addr), 32)
        .execute()
        .await
        .map_err(err("adding"))?;
    Ok(true)
}

/// Removes `addr/32` from `lo` if it is there. Returns whether it removed it.
pub async fn remove_from_loopback(addr: Ipv4Addr) -> Result<bool, AddressError> {
    let handle = handle()?;
    let err = |action| netlink_error(action, addr);
    let found = handle
        .address()
        .get()
        .set_link_index_filter(LOOPBACK_INDEX)
        .set_address_filter(IpAddr::V4(addr))
        .set_prefix_length_filter(32)
        .execute()
        .try_next()
        .await
        .map_err(err("looking up"))?;
    let Some(message) = found else {
        return Ok(false);
    };
    handle
        .address()
        .del(message)
        .execute()
        .await
        .map_err(err("removing"))?;
    Ok(true)
}
