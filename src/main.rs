//! The `regcache` command: parse the command line, load config, set up logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use regcache::Config;
use regcache::config::LogFormat;

/// `regcache --version`: the crate version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("REGCACHE_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "regcache",
    version = VERSION,
    about = "A caching pull-through proxy for container registries",
    after_help = "Configuration: flags > REGCACHE_* environment variables > the config file > \
                  defaults. Any key can be set by a variable: REGCACHE_LISTEN, \
                  REGCACHE_CACHE__MAX_SIZE=200GiB, REGCACHE_UPSTREAMS__DOCKER_IO__USERNAME \
                  (`__` between levels). `regcache check-config` shows what is wrong and where."
)]
struct Cli {
    /// Log format (overrides log.format in the config).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry mirror (the embedded default config unless --config is given).
    Serve(ServeArgs),
    /// Check a configuration (the file, or the embedded default, with REGCACHE_* variables
    /// applied) and explain every problem: key path, where it was set, a hint.
    CheckConfig {
        /// The file to check; without it, the embedded default.
        #[arg(env = "REGCACHE_CONFIG")]
        file: Option<PathBuf>,
    },
    /// Ask a running server whether it is alive (`/healthz`) or ready (`/readyz`); exits
    /// non-zero if not. For container health checks, where there is no curl. Asks
    /// `metrics_listen` when set, else `listen`.
    Health {
        /// Config file naming the listen address; without it the embedded default is used.
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        /// The server's address (overrides the config's `metrics_listen` and `listen`).
        #[arg(long, value_name = "ADDR")]
        addr: Option<std::net::SocketAddr>,
        /// Ask `/readyz` (index and data dir usable) instead of `/healthz`.
        #[arg(long)]
        ready: bool,
    },
    /// Re-hash every cached object against its digest and check the index against the files
    /// (on a stopped cache's data dir). Exits non-zero if problems remain.
    Verify {
        #[command(flatten)]
        data: DataArgs,
        /// Remove corrupt and stray files and drop index entries without a file.
        #[arg(long)]
        repair: bool,
    },
    /// Evict now, as the running cache would: by `max_size`, `min_free_disk` and `max_age`
    /// (on a stopped cache's data dir); prints what went and what was freed.
    Gc {
        #[command(flatten)]
        data: DataArgs,
        /// Only print what would go.
        #[arg(long)]
        dry_run: bool,
        /// Cap to evict to (overrides cache.max_size), e.g. 200GiB.
        #[arg(long, value_parser = parse_size_arg)]
        max_size: Option<u64>,
    },
    /// List what is cached: repositories, tags, digests, sizes, last use.
    Ls {
        #[command(flatten)]
        data: DataArgs,
        /// Only this upstream.
        #[arg(long)]
        upstream: Option<String>,
        /// Only this repository (as upstream names it, e.g. library/alpine).
        #[arg(long)]
        repo: Option<String>,
    },
    /// Pull images into the cache (every platform, every layer) with an embedded instance on
    /// the data dir; for a running server use its admin API (`POST /admin/warm?image=REF`).
    Warm {
        #[command(flatten)]
        data: DataArgs,
        /// A file with one image reference per line (`#` comments allowed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Only these platforms of multi-platform images (repeatable), e.g. linux/amd64.
        #[arg(long = "platform", value_name = "OS/ARCH")]
        platforms: Vec<String>,
        /// Warm through a running server's admin API at this address (its `admin_listen`)
        /// instead of an embedded instance on the data dir.
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
        /// Image references, as for `resolve`.
        images: Vec<String>,
    },
    /// Size, object count and (from a running server's metrics, if up) the hit ratio.
    Stats {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Show where an image reference goes: upstream, URL, repository, reference, and why.
    Resolve {
        /// Config file (TOML); without it the embedded default is used.
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        /// containerd's `ns` parameter, as a mirror request from containerd carries it.
        #[arg(long)]
        ns: Option<String>,
        /// An image reference as a user types it: `alpine`, `ghcr.io/org/app:1`,
        /// `registry.example.com:5000/team/web@sha256:...`.
        reference: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (TOML); without it the embedded default is used.
    #[arg(long, short, env = "REGCACHE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:5000.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Directory for cached content and the index.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Set an upstream's URL: NAME=URL (repeatable). `docker.io=URL` replaces Docker Hub.
    #[arg(long = "upstream", value_name = "NAME=URL", value_parser = parse_upstream)]
    upstreams: Vec<(String, String)>,
}

/// Which data dir an offline command works on.
#[derive(clap::Args)]
struct DataArgs {
    /// Config file (TOML) naming the data dir; without it the embedded default is used.
    #[arg(long, short, env = "REGCACHE_CONFIG")]
    config: Option<PathBuf>,
    /// The data dir (overrides the config).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl DataArgs {
    /// The config with the data dir override applied.
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        anyhow::ensure!(
            config.data_dir.join("blobs").is_dir(),
            "{} is not a regcache data dir (no blobs/ in it)",
            config.data_dir.display()
        );
        Ok(config)
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    regcache::config::parse_size(s)
}

fn parse_upstream(s: &str) -> Result<(String, String), String> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=URL"))?;
    Ok((name.to_owned(), url.to_owned()))
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regcache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Keeps freed buffers in glibc's heap for reuse instead of handing them back to the kernel.
///
/// By default glibc serves blocks over its mmap threshold (128 KiB, then adapting) with fresh
/// mappings and returns a heap's free top to the kernel past its trim threshold. A cold fill
/// retires hyper's receive buffers (up to about 400 KiB) as fast as it takes new ones, so each
/// new one arrived as pages the kernel had to fault in and zero: 7% of regcache's samples in a
/// profiled cold pull. With fixed thresholds (blocks under 1 MiB from the heap, up to 16 MiB
/// of free top kept) that fell to 2%, and the cold pull's CPU by a tenth (BENCHMARKS.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    // SAFETY: mallopt(3) only sets allocator parameters; nothing else runs yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { file } => {
            let config = Config::load(file.as_deref())?;
            let origin = file
                .as_ref()
                .map_or("<embedded>".to_owned(), |f| f.display().to_string());
            let vars: Vec<String> = std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .filter(|k| {
                    k.starts_with(regcache::config::ENV_PREFIX)
                        && !["REGCACHE_CONFIG", "REGCACHE_GIT_COMMIT"].contains(&k.as_str())
                })
                .collect();
            println!("{origin}: ok");
            if let Some(w) = file.as_deref().and_then(Config::exposure_warning) {
                println!("  warning:     {w}");
            }
            if !vars.is_empty() {
                println!("  environment: {}", vars.join(", "));
            }
            println!("  listen:      {}", config.listen);
            println!("  data_dir:    {}", config.data_dir.display());
            if config.storage.kind == regcache::config::StorageKind::S3 {
                let s3 = &config.storage.s3;
                println!(
                    "  storage:     s3 bucket {} at {}",
                    s3.bucket.as_deref().unwrap_or_default(),
                    s3.endpoint.as_deref().unwrap_or("AWS")
                );
            }
            for (name, u) in &config.upstreams {
                let default = if *name == config.default_upstream {
                    " (default)"
                } else {
                    ""
                };
                println!("  upstream:    {name}{default} -> {}", u.urls.join(", "));
            }
            Ok(())
        }
        Command::Health {
            config,
            addr,
            ready,
        } => {
            let addr = match addr {
                Some(a) => a,
                None => {
                    // The metrics listener when there is one: it speaks plain HTTP even when
                    // `listen` has TLS on.
                    let c = Config::load(config.as_deref())?;
                    let mut a = match (c.metrics_listen, c.tls.files()) {
                        (Some(m), _) => m,
                        (None, None) => c.listen,
                        (None, Some(_)) => anyhow::bail!(
                            "tls is on for listen: set metrics_listen (plain HTTP) for health checks, or pass --addr"
                        ),
                    };
                    // A wildcard listener is reached on loopback.
                    if a.ip().is_unspecified() {
                        a.set_ip(if a.is_ipv4() {
                            std::net::Ipv4Addr::LOCALHOST.into()
                        } else {
                            std::net::Ipv6Addr::LOCALHOST.into()
                        });
                    }
                    a
                }
            };
            let path = if ready { "/readyz" } else { "/healthz" };
            let (status, body) =
                local_request(addr, "GET", path, std::time::Duration::from_secs(5))
                    .with_context(|| format!("GET http://{addr}{path}"))?;
            anyhow::ensure!(status == 200, "{path} at {addr}: {status} {}", body.trim());
            println!("{path} at {addr}: {}", body.trim());
            Ok(())
        }
        Command::Gc {
            data,
            dry_run,
            max_size,
        } => {
            use regcache::cache::lifecycle;
            let mut config = data.config()?;
            if let Some(m) = max_size {
                config.cache.max_size = m;
            }
            let (store, index) = regcache::cache::open_offline(&config.data_dir)?;
            let policy = lifecycle::Policy::from_config(&config);
            anyhow::ensure!(
                policy.is_active(),
                "nothing bounds the cache: set cache.max_size, min_free_disk or max_age, or pass --max-size"
            );
            let pinned = lifecycle::pinned(&config, &store, &index);
            let free = store.free_space().map(|(free, _)| free);
            let plan = lifecycle::plan(
                &store,
                &index,
                &policy,
                &pinned,
                free,
                std::time::SystemTime::now(),
            )?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for v in &plan.victims {
                println!("{verb} {} ({} bytes, {})", v.digest, v.size, v.reason);
            }
            if !dry_run {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(lifecycle::execute(&plan, &store, &index))?;
                index.flush()?;
            }
            println!(
                "{verb} {} objects, {} of {} bytes; {} pinned objects kept",
                plan.victims.len(),
                plan.freed,
                plan.usage_before,
                pinned.len()
            );
            Ok(())
        }
        Command::Warm {
            data,
            file,
            platforms,
            admin,
            images,
        } => {
            let mut all = images;
            if let Some(f) = file {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                all.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned),
                );
            }
            anyhow::ensure!(!all.is_empty(), "no images given");
            if let Some(addr) = admin {
                return warm_remote(addr, &all, &platforms);
            }
            let config = data.config()?;
            init_logging(&config, cli.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let proxy = regcache::proxy::Proxy::new(std::sync::Arc::new(config)).map_err(|e| {
                    anyhow::anyhow!(
                        "{e} (if a server is running on this data dir, use its admin API: POST /admin/warm?image=REF)"
                    )
                })?;
                let (mut ok, mut bytes) = (0, 0);
                let total = all.len();
                // A bar on a terminal (stderr); plain result lines on stdout either way.
                let bar = indicatif::ProgressBar::new(total as u64).with_style(
                    indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {wide_msg}")
                        .expect("valid template"),
                );
                for (i, image) in all.iter().enumerate() {
                    bar.set_message(image.clone());
                    let line = match proxy.warm(image, &platforms).await {
                        Ok(w) => {
                            ok += 1;
                            bytes += w.bytes;
                            format!(
                                "[{}/{total}] {image}: {} ({} objects, {} bytes)",
                                i + 1,
                                w.digest,
                                w.objects,
                                w.bytes
                            )
                        }
                        Err(e) => format!("[{}/{total}] {image}: FAILED: {e}", i + 1),
                    };
                    bar.suspend(|| println!("{line}"));
                    bar.inc(1);
                }
                bar.finish_and_clear();
                // Fills commit just after their last byte is read: let them finish.
                proxy.drain(std::time::Duration::from_secs(60)).await;
                proxy.flush().map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("warmed {ok} of {total} images, {bytes} bytes");
                anyhow::ensure!(ok == total, "{} images failed", total - ok);
                Ok(())
            })
        }
        Command::Stats { data } => {
            let config = data.config()?;
            let files = regcache::cache::blobs::Store::view(&config.data_dir).files()?;
            let (bytes, objects) = (files.iter().map(|f| f.size).sum::<u64>(), files.len());
            println!("data dir: {}", config.data_dir.display());
            println!("cached:   {objects} objects, {bytes} bytes");
            match scrape(config.listen) {
                Some(text) => {
                    let sum = |pred: &dyn Fn(&str) -> bool| -> f64 {
                        text.lines()
                            .filter(|l| l.starts_with("regcache_cache_lookups_total{") && pred(l))
                            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                            .sum()
                    };
                    let all = sum(&|_| true);
                    let hits = sum(&|l| {
                        ["hit", "stale", "revalidated"]
                            .iter()
                            .any(|r| l.contains(&format!("result=\"{r}\"")))
                    });
                    if all > 0.0 {
                        println!(
                            "server:   up at {}; hit ratio since start {:.1}% ({hits} of {all} lookups)",
                            config.listen,
                            100.0 * hits / all
                        );
                    } else {
                        println!("server:   up at {}; no lookups yet", config.listen);
                    }
                }
                None => println!("server:   not reachable at {}", config.listen),
            }
            Ok(())
        }
        Command::Ls {
            data,
            upstream,
            repo,
        } => {
            let config = data.config()?;
            let (store, index) = regcache::cache::open_offline(&config.data_dir)?;
            let rows = regcache::cache::lifecycle::list(
                &store,
                &index,
                upstream.as_deref(),
                repo.as_deref(),
            )?;
            println!("UPSTREAM\tREPOSITORY\tTAG\tDIGEST\tSIZE\tLAST USE");
            for r in &rows {
                let last = if r.last_use_ms == 0 {
                    "-".to_owned()
                } else {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.last_use_ms),
                    )
                    .to_string()
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{last}",
                    r.upstream, r.repo, r.tag, r.digest, r.size
                );
            }
            Ok(())
        }
        Command::Verify { data, repair } => {
            let dir = data.config()?.data_dir;
            let (store, index) = regcache::cache::open_offline(&dir)?;
            let report = regcache::cache::verify::verify(&store, &index, repair)
                .with_context(|| format!("verifying {}", dir.display()))?;
            print!("{report}");
            anyhow::ensure!(
                report.repaired || report.is_clean(),
                "problems found; run again with --repair to remove them"
            );
            Ok(())
        }
        Command::Resolve {
            config,
            ns,
            reference,
        } => {
            let config = Config::load(config.as_deref())?;
            print!("{}", resolve(&config, &reference, ns.as_deref())?);
            Ok(())
        }
        Command::Serve(args) => {
            let mut config = Config::load(args.config.as_deref())?;
            if let Some(l) = args.listen {
                config.listen = l;
            }
            if let Some(d) = args.data_dir {
                config.data_dir = d;
            }
            for (name, url) in &args.upstreams {
                config.set_upstream_url(name, url);
            }
            config
                .validate()
                .map_err(|p| anyhow::anyhow!("after command-line overrides:\n{p}"))?;
            init_logging(&config, cli.log_format);
            if let Some(w) = args.config.as_deref().and_then(Config::exposure_warning) {
                tracing::warn!("{w}");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(regcache::run(config, shutdown_signal()))?;
            Ok(())
        }
    }
}

/// `regcache resolve`: the request path a client would send for `reference`, and its route.
fn resolve(config: &Config, reference: &str, ns: Option<&str>) -> anyhow::Result<String> {
    use regcache::oci::image_ref::{ImageRef, Name};
    let r: ImageRef = reference
        .parse()
        .with_context(|| format!("{reference:?} is not an image reference"))?;
    // containerd's ns carries the registry, so the path is the repository alone.
    let name: Name = match ns {
        Some(_) => r.repo.to_string().parse()?,
        None => r.request_name(),
    };
    let route = regcache::proxy::Router::new(config)
        .route(&name, ns)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let upstream = &config.upstreams[&route.upstream];
    let mut out = format!(
        "reference:  {r}\nupstream:   {}\nrepository: {}\nreference:  {}\nwhy:        {}\n",
        route.upstream,
        route.repo,
        r.reference(),
        route.why
    );
    for url in &upstream.urls {
        out.push_str(&format!(
            "url:        {}/v2/{}/manifests/{}\n",
            url.trim_end_matches('/'),
            route.repo,
            r.reference()
        ));
    }
    Ok(out)
}

/// One plain HTTP/1.0 request to a local server: (status, body).
fn local_request(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(
        format!("{method} {target} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// `GET /metrics` from a running server, with a short deadline.
fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    match local_request(addr, "GET", "/metrics", std::time::Duration::from_secs(2)) {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// `regcache warm --admin ADDR`: each image through a running server's `/admin/warm`.
fn warm_remote(
    addr: std::net::SocketAddr,
    images: &[String],
    platforms: &[String],
) -> anyhow::Result<()> {
    let total = images.len();
    let mut ok = 0;
    for (i, image) in images.iter().enumerate() {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("image", image);
        for p in platforms {
            q.append_pair("platform", p);
        }
        let target = format!("/admin/warm?{}", q.finish());
        let (status, body) =
            local_request(addr, "POST", &target, std::time::Duration::from_secs(3600))
                .with_context(|| format!("admin API at {addr}"))?;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 {
            ok += 1;
            println!(
                "[{}/{total}] {image}: {} ({} objects, {} bytes)",
                i + 1,
                v[0]["digest"].as_str().unwrap_or("?"),
                v[0]["objects"],
                v[0]["bytes"]
            );
        } else {
            let why = v["errors"][0]["message"].as_str().unwrap_or(body.trim());
            println!("[{}/{total}] {image}: FAILED: {why}", i + 1);
        }
    }
    println!("warmed {ok} of {total} images");
    anyhow::ensure!(ok == total, "{} images failed", total - ok);
    Ok(())
}

fn init_logging(config: &Config, format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format.unwrap_or(config.log.format) {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
