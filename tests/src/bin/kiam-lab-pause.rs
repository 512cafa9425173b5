//! `kiam-lab-pause`: the node lab's sandbox ("pause") process, and the workload image's idle
//! command. As PID 1 of a pod it holds the pod's namespaces, reaps the orphans it inherits,
//! and ends on SIGTERM or SIGINT (PID 1 gets no default signal handling).

use nix::{
    sys::{
        signal::{SigSet, Signal},
        wait::{WaitPidFlag, waitpid},
    },
    unistd::Pid,
};

fn main() -> std::process::ExitCode {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(signal);
    }
    if let Err(e) = signals.thread_block() {
        eprintln!("kiam-lab-pause: blocking signals: {e}");
        return std::process::ExitCode::FAILURE;
    }
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => return std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiam-lab-pause: sigwait: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
}
