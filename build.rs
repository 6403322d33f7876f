//! Records the git commit the binary is built from, for `--version`.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|out| !out.stdout.is_empty());
    let version = match commit {
        Some(commit) if dirty => format!("{commit}, modified"),
        Some(commit) => commit,
        None => "commit unknown".into(),
    };
    println!("cargo:rustc-env=SENSORD_BUILD={version}");
    // Rebuilt when HEAD moves or the index changes (a worktree's git
    // folder is elsewhere); outside git, never again.
    let git_dir = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok());
    match git_dir {
        Some(dir) => {
            for file in ["HEAD", "index"] {
                println!("cargo:rerun-if-changed={}/{file}", dir.trim());
            }
        }
        None => println!("cargo:rerun-if-changed=build.rs"),
    }
}
