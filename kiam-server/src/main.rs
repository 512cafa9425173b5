//! `kiam-server`: the only kiam component allowed to assume roles. Not built yet: the pod
//! index, role policy, STS credentials and gRPC API are tracked in their own issue.

fn main() -> std::process::ExitCode {
    eprintln!("kiam-server: not implemented yet");
    std::process::ExitCode::FAILURE
}
