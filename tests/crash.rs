//! Crash safety: the real binary is killed with SIGKILL at arbitrary points while it fills
//! large blobs; after each kill `regcache verify` finds nothing corrupt, and in the end every
//! image pulls with the right bytes.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::image::{DOCKER_V2, Image, Layer};
use common::{Registry, http, pull};

struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(config: &Path, log: &Path) -> Serve {
    let port = common::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["serve", "--config"])
        .arg(config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    common::wait_http(&format!("{url}/v2/"), "regcache").await;
    Serve { child, url }
}

fn verify(data: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["verify", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "verify failed after a crash:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_fill_never_leaves_a_corrupt_object() {
    let registry = Registry::start().await;
    // One image per round, so every round has cold fills to interrupt.
    const ROUNDS: u64 = 5;
    let images: Vec<Image> = (0..ROUNDS)
        .map(|i| {
            Image::new(
                DOCKER_V2,
                "amd64",
                vec![
                    Layer::new(700 + i * 2, 12 << 20),
                    Layer::new(701 + i * 2, 6 << 20),
                ],
            )
        })
        .collect();
    for (i, img) in images.iter().enumerate() {
        registry.push(&format!("crash/app{i}"), "1", img).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[log]\nlevel = \"info\"\n[upstreams.\"docker.io\"]\nurls = [\"{}\"]\n",
            data.display(),
            registry.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("regcache.log");

    // Kill points spread over a fill's life: before, during and around commits.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut interrupted = 0;
    for (round, img) in images.iter().enumerate() {
        let server = serve(&config, &log).await;
        let mut pulls = Vec::new();
        for d in img.blobs().iter().map(|b| common::image::sha256(b)) {
            let url = format!("{}/v2/crash/app{round}/blobs/{d}", server.url);
            pulls.push(tokio::spawn(async move {
                if let Ok(r) = http().get(url).send().await {
                    let _ = r.bytes().await;
                }
            }));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = Duration::from_millis(2 + seed % 60);
        tokio::time::sleep(at).await;
        drop(server); // SIGKILL
        for p in pulls {
            let _ = p.await;
        }
        // Temp files left behind mean the kill landed mid-fill.
        if std::fs::read_dir(data.join("tmp")).is_ok_and(|d| d.count() > 0) {
            interrupted += 1;
        }
        let report = verify(&data);
        assert!(
            report.contains(" 0 corrupt"),
            "round {round} (kill at {at:?}):\n{report}"
        );
    }
    assert!(interrupted > 0, "no kill landed during a fill");

    // After all that, everything pulls whole.
    let server = serve(&config, &log).await;
    for (i, img) in images.iter().enumerate() {
        assert_eq!(
            pull(&server.url, &format!("crash/app{i}"), "1").await,
            img.digest()
        );
    }
    // verify refuses a data dir a running server holds.
    let out = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running regcache"), "{err}");
    // Nor does a second server on it clear the running one's fills from tmp/.
    let in_flight = data.join("tmp").join("fill.in-flight");
    std::fs::write(&in_flight, b"part of a blob").unwrap();
    let second = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", common::free_port()))
        .output()
        .unwrap();
    assert!(!second.status.success(), "a second server on one data dir");
    assert!(
        in_flight.exists(),
        "the second server removed a fill's temp file"
    );
    std::fs::remove_file(&in_flight).unwrap();
    drop(server);
    let report = verify(&data);
    assert!(
        report.contains("0 corrupt, 0 stray files, 0 index entries without a file"),
        "{report}"
    );
}
