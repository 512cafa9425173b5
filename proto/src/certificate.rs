//! What an agent's certificate says about its node: `spiffe://kiam/node/<name>` URI SANs,
//! the second way (after the projected token) for an agent to prove its node. Written by
//! `cargo xtask certs` and cert-manager, read by the servers.

/// The URI SAN prefix that names an agent's node.
pub const NODE_URI_PREFIX: &str = "spiffe://kiam/node/";

/// Nodes named by `spiffe://kiam/node/<name>` URI SANs of a leaf certificate (DER); none for
/// a certificate that does not parse.
pub fn node_identities(leaf: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => {
                uri.strip_prefix(NODE_URI_PREFIX).map(str::to_owned)
            }
            _ => None,
        })
        .collect()
}
