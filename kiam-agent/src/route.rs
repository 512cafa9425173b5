//! Which part of the instance-metadata API a request path names. Pure parsing, no I/O.
//!
//! The rules that keep the node's credentials out of reach, whatever `--allow-route-regexp`
//! says:
//! - Paths that a server could read differently from this parser are refused: empty segments
//!   (`//`), `.` and `..` segments, backslashes, non-ASCII and control characters, and any
//!   percent-encoding of a letter, digit, `-._~`, `/`, `\` or a control character. RFC 3986
//!   makes `%69am` the same as `iam`: a metadata service that decodes would read a name this
//!   parser never saw. No SDK encodes those (IAM role names use letters, digits and
//!   `+=,.@_-`); the encodings left (`%20`, `%2B`, `%40`, …) cannot spell any of the names
//!   below, and are forwarded as written.
//! - Every IAM path is kiam's own, under any version prefix (`/latest`, `/2016-09-02`, …), as
//!   kiam did with `/{version}/`: a pod sees its own role there, never the node's.
//! - The node's EC2 identity credentials (`identity-credentials/`) and its signed identity
//!   documents (`dynamic/instance-identity/{pkcs7,signature,rsa2048}`, which let a pod pose
//!   as the node, e.g. to Vault's AWS auth) are never forwarded; neither is the node's
//!   `user-data` (bootstrap secrets on self-managed nodes) unless `--allow-user-data`.
//!
//! Those checks compare case-insensitively: a real metadata service that folded case must
//! not see a spelling this parser let through.

/// Where a request path leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `PUT /latest/api/token`.
    Token,
    /// `/<version>/meta-data/iam` (the listing of `info` and `security-credentials/`).
    IamRoot,
    /// `/<version>/meta-data/iam/info`.
    IamInfo,
    /// `/<version>/meta-data/iam/security-credentials/`: the role name.
    IamRoleList,
    /// `/<version>/meta-data/iam/security-credentials/<role>`.
    IamCredentials(&'a str),
    /// Anything else below `meta-data/iam` (in any spelling): answered 404 by kiam.
    IamOther,
    /// The node's identity credentials and signed identity documents: never forwarded.
    NodeIdentity,
    /// The node's user data: forwarded only with `--allow-user-data`.
    UserData,
    /// Anything else: forwarded only when the allow-list matches.
    Other,
}

/// Why a path is refused before anything else looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with /")]
    NotAbsolute,
    #[error("empty path segments (//) are not allowed")]
    EmptySegment,
    #[error(". and .. path segments are not allowed")]
    DotSegment,
    #[error("backslashes are not allowed in paths")]
    Backslash,
    #[error(
        "percent-encoded letters, digits, -._~, /, \\ or control characters are not allowed in paths"
    )]
    EncodedCharacter,
    #[error("a % in a path must be followed by two hexadecimal digits")]
    MalformedEncoding,
    #[error("non-ASCII and control characters are not allowed in paths")]
    NonAscii,
}

/// Whether a percent-encoded byte could change how a path is read once decoded: RFC 3986's
/// unreserved characters (decoded, they are the same path), separators, and anything that is
/// not printable ASCII.
fn dangerous_when_decoded(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\')
        || !(0x20..0x7f).contains(&byte)
}

fn check_characters(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.iter().any(|b| !(0x20..0x7f).contains(b)) {
        return Err(PathError::NonAscii);
    }
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'%') {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            None => return Err(PathError::MalformedEncoding),
            Some(byte) if dangerous_when_decoded(byte) => {
                return Err(PathError::EncodedCharacter);
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks a path (without query) and says where it leads. Allocation-free but for the
/// segment list: it runs for every request.
pub fn classify(path: &str) -> Result<Route<'_>, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    check_characters(path)?;
    if rest.is_empty() {
        return Ok(Route::Other);
    }
    // A trailing slash is how directories are listed; any other empty segment is refused.
    let segments: Vec<&str> = rest.strip_suffix('/').unwrap_or(rest).split('/').collect();
    for segment in &segments {
        match *segment {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    if path == "/latest/api/token" {
        return Ok(Route::Token);
    }
    let is = |segment: &str, name: &str| segment.eq_ignore_ascii_case(name);
    // Never forwarded, wherever they sit in the path and however they are spelled.
    if segments.iter().any(|s| is(s, "identity-credentials")) {
        return Ok(Route::NodeIdentity);
    }
    if let Some(i) = segments.iter().position(|s| is(s, "instance-identity"))
        && segments.get(i + 1).is_some_and(|doc| !is(doc, "document"))
    {
        return Ok(Route::NodeIdentity);
    }
    if segments.iter().any(|s| is(s, "user-data")) {
        return Ok(Route::UserData);
    }
    let Some(iam) = segments
        .windows(2)
        .position(|pair| is(pair[0], "meta-data") && is(pair[1], "iam"))
    else {
        return Ok(Route::Other);
    };
    // kiam answers IAM paths with the exact spelling SDKs use, under one version segment.
    let exact = iam == 1
        && segments[1] == "meta-data"
        && segments[2] == "iam"
        && segments[3..]
            .first()
            .is_none_or(|s| *s == "info" || *s == "security-credentials");
    if !exact {
        return Ok(Route::IamOther);
    }
    Ok(match &segments[3..] {
        [] => Route::IamRoot,
        ["info"] => Route::IamInfo,
        ["security-credentials"] => Route::IamRoleList,
        ["security-credentials", role] => Route::IamCredentials(role),
        _ => Route::IamOther,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_lead_where_kiam_says() {
        use Route::*;
        let cases: &[(&str, Result<Route<'_>, PathError>)] = &[
            ("/latest/api/token", Ok(Token)),
            ("/latest/meta-data/iam", Ok(IamRoot)),
            ("/latest/meta-data/iam/", Ok(IamRoot)),
            ("/latest/meta-data/iam/info", Ok(IamInfo)),
            ("/latest/meta-data/iam/info/", Ok(IamInfo)),
            (
                "/latest/meta-data/iam/security-credentials",
                Ok(IamRoleList),
            ),
            (
                "/latest/meta-data/iam/security-credentials/",
                Ok(IamRoleList),
            ),
            (
                "/latest/meta-data/iam/security-credentials/app",
                Ok(IamCredentials("app")),
            ),
            (
                "/latest/meta-data/iam/security-credentials/app/",
                Ok(IamCredentials("app")),
            ),
            // Any version prefix: kiam's answer, never the node's.
            (
                "/2016-09-02/meta-data/iam/security-credentials/",
                Ok(IamRoleList),
            ),
            ("/2021-01-03/meta-data/iam/info", Ok(IamInfo)),
            (
                "/1.0/meta-data/iam/security-credentials/x",
                Ok(IamCredentials("x")),
            ),
            // Other spellings and depths below meta-data/iam: kiam's 404, never forwarded.
            ("/latest/meta-data/IAM/security-credentials/", Ok(IamOther)),
            ("/latest/Meta-Data/iam/info", Ok(IamOther)),
            ("/meta-data/iam/security-credentials/", Ok(IamOther)),
            ("/a/b/meta-data/iam/info", Ok(IamOther)),
            (
                "/latest/meta-data/iam/security-credentials/a/b",
                Ok(IamOther),
            ),
            ("/latest/meta-data/iam/unknown", Ok(IamOther)),
            // The node's identity: never forwarded.
            (
                "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                Ok(NodeIdentity),
            ),
            ("/latest/meta-data/Identity-Credentials/", Ok(NodeIdentity)),
            ("/latest/dynamic/instance-identity/pkcs7", Ok(NodeIdentity)),
            (
                "/latest/dynamic/instance-identity/signature",
                Ok(NodeIdentity),
            ),
            (
                "/latest/dynamic/instance-identity/rsa2048",
                Ok(NodeIdentity),
            ),
            (
                "/latest/dynamic/instance-identity/rsa4096/",
                Ok(NodeIdentity),
            ),
            (
                "/2022-09-24/dynamic/instance-identity/PKCS7",
                Ok(NodeIdentity),
            ),
            // The unsigned document and listings are ordinary paths.
            ("/latest/dynamic/instance-identity/document", Ok(Other)),
            ("/latest/dynamic/instance-identity/", Ok(Other)),
            ("/latest/meta-data/placement/region", Ok(Other)),
            ("/latest/meta-data/", Ok(Other)),
            ("/", Ok(Other)),
            ("/kiam/v1/identity", Ok(Other)),
            // Refused before anything else.
            (
                "/latest//meta-data/iam/security-credentials/",
                Err(PathError::EmptySegment),
            ),
            ("//latest/meta-data/", Err(PathError::EmptySegment)),
            ("/latest/meta-data//", Err(PathError::EmptySegment)),
            ("/latest/./meta-data/iam/info", Err(PathError::DotSegment)),
            (
                "/latest/meta-data/iam/../iam/info",
                Err(PathError::DotSegment),
            ),
            ("/latest/meta-data/..", Err(PathError::DotSegment)),
            (
                "/latest/meta-data/iam/%2E%2E/iam/security-credentials/",
                Err(PathError::EncodedCharacter),
            ),
            (
                "/latest/meta-data%2fiam/info",
                Err(PathError::EncodedCharacter),
            ),
            ("/latest/meta-data/%2e/x", Err(PathError::EncodedCharacter)),
            ("/latest/meta-data/%5C", Err(PathError::EncodedCharacter)),
            ("/latest/meta-data/x%00", Err(PathError::EncodedCharacter)),
            // Encoded letters spell what the parser would otherwise see (the probe's
            // findings: each reached the node with --allow-route-regexp '.*').
            (
                "/latest/meta-data/%69am/security-credentials/",
                Err(PathError::EncodedCharacter),
            ),
            (
                "/latest/meta%2Ddata/iam/security-credentials/",
                Err(PathError::EncodedCharacter),
            ),
            (
                "/latest/meta-data/%69dentity-credentials/ec2/security-credentials/ec2-instance",
                Err(PathError::EncodedCharacter),
            ),
            (
                "/latest/dynamic/%69nstance-identity/pkcs7",
                Err(PathError::EncodedCharacter),
            ),
            ("/latest/user%2Ddata", Err(PathError::EncodedCharacter)),
            ("/latest/meta-data/%7e", Err(PathError::EncodedCharacter)),
            ("/latest/meta-data/%0a", Err(PathError::EncodedCharacter)),
            ("/latest/meta-data/%c3%a9", Err(PathError::EncodedCharacter)),
            ("/latest/meta-data/x%", Err(PathError::MalformedEncoding)),
            ("/latest/meta-data/x%6", Err(PathError::MalformedEncoding)),
            ("/latest/meta-data/x%zz", Err(PathError::MalformedEncoding)),
            ("/latest/meta-data/\u{e9}", Err(PathError::NonAscii)),
            ("/latest/meta-data/x\ty", Err(PathError::NonAscii)),
            // The node's user data: kiam's 404 unless --allow-user-data.
            ("/latest/user-data", Ok(UserData)),
            ("/2009-04-04/user-data/", Ok(UserData)),
            ("/latest/USER-DATA", Ok(UserData)),
            ("/latest\\meta-data", Err(PathError::Backslash)),
            ("latest/meta-data", Err(PathError::NotAbsolute)),
            ("", Err(PathError::NotAbsolute)),
        ];
        for (path, want) in cases {
            assert_eq!(classify(path), *want, "{path:?}");
        }
    }

    #[test]
    fn ordinary_percent_encodings_pass() {
        // Instance tag keys may contain spaces; role names +=,@ (which some clients encode).
        assert_eq!(
            classify("/latest/meta-data/tags/instance/Cost%20Center"),
            Ok(Route::Other)
        );
        assert_eq!(
            classify("/latest/meta-data/iam/security-credentials/team%2Bapp%40x"),
            Ok(Route::IamCredentials("team%2Bapp%40x"))
        );
    }
}
