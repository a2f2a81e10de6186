//! Records the git commit the binary is built from, for `regcache --version` and the
//! `regcache_build_info` metric. `REGCACHE_GIT_COMMIT` in the environment wins (a container
//! build has no `.git`); without either the commit is "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=REGCACHE_GIT_COMMIT");
    let commit = std::env::var("REGCACHE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=REGCACHE_GIT_COMMIT={commit}");
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs. In a linked
    // worktree HEAD is the worktree's own, while branches live in the common git dir.
    let dir = |arg: &str| {
        Command::new("git")
            .args(["rev-parse", arg])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let (git_dir, common) = (dir("--git-dir")?, dir("--git-common-dir")?);
    // (Only files that exist: cargo reruns a script whose watched file is missing every time.)
    let mut watch = vec![format!("{git_dir}/HEAD"), format!("{common}/packed-refs")];
    if let Ok(head) = std::fs::read_to_string(format!("{git_dir}/HEAD"))
        && let Some(r) = head.strip_prefix("ref: ")
    {
        watch.push(format!("{common}/{}", r.trim()));
    }
    for path in watch.iter().filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
