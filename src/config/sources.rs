//! Where a configuration comes from, and how its mistakes are explained.
//!
//! Layers, lowest first: the defaults (serde defaults, named constants in `config`), the file
//! (or the embedded default), then `REGCACHE_*` environment variables; `main` applies
//! command-line flags last. So a flag beats the environment, which beats the file.
//!
//! Every problem is reported at once, each with its key path (`cache.tag_ttl`), where it was
//! set (the file, or which variable) and, where one helps, a hint.

use std::path::Path;

use super::{Config, LoadError, Problems};

/// Environment variables starting with this set config keys.
pub const ENV_PREFIX: &str = "REGCACHE_";
/// Separates nesting levels in a variable name: `REGCACHE_CACHE__MAX_SIZE` is `cache.max_size`.
pub const ENV_NESTING: &str = "__";
/// Variables with the prefix that are not config keys: the config file's path, and the
/// commit the build recorded (cargo passes it on to `cargo run` and tests).
const NOT_KEYS: [&str; 2] = ["REGCACHE_CONFIG", "REGCACHE_GIT_COMMIT"];
/// Bad keys reported before giving up (each retry parses the tree again).
const MAX_PROBLEMS: usize = 32;

/// One `REGCACHE_*` variable, mapped onto the config tree.
#[derive(Debug, Clone)]
struct EnvSetting {
    var: String,
    path: Vec<String>,
    raw: String,
}

/// Parses `text` (from `origin`), lays `env` over it and deserializes and validates the result,
/// collecting every problem.
pub fn load(
    text: &str,
    origin: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, LoadError> {
    let mut tree: toml::Table = toml::from_str(text).map_err(|e| LoadError::Parse {
        path: origin.to_owned(),
        source: Box::new(e),
    })?;
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut settings = Vec::new();
    let mut problems = Vec::new();
    for (var, raw) in env.iter().cloned() {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if NOT_KEYS.contains(&var.as_str()) {
            continue;
        }
        let segments: Vec<&str> = rest.split(ENV_NESTING).collect();
        if segments.iter().any(|s| s.is_empty()) {
            problems.push(format!(
                "{var}: not a config key (levels are joined by {ENV_NESTING}, e.g. REGCACHE_CACHE__MAX_SIZE)"
            ));
            continue;
        }
        let path = overlay(&mut tree, &segments, env_value(&raw));
        settings.push(EnvSetting { var, path, raw });
    }

    // A variable's value read as TOML (`12345`, `true`) where the key wants text is read
    // again as the variable's text, once: this holds the TOML value's error for each variable
    // so read, in case the text is wrong too.
    let mut as_toml: Vec<Option<(String, String)>> = vec![None; settings.len()];
    let mut config = None;
    // Each variable's second reading takes a pass of its own, beside the problems' passes.
    for _ in 0..MAX_PROBLEMS + settings.len() {
        match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(tree.clone())) {
            Ok(c) => {
                config = Some(c);
                break;
            }
            Err(e) => {
                let (path, mut message) = error_path(&e);
                let mut inner = e.into_inner().message().to_owned();
                let set_by = settings.iter().position(|s| s.path == path);
                if let Some(i) = set_by {
                    let s = &settings[i];
                    match &as_toml[i] {
                        None if !matches!(env_value(&s.raw), toml::Value::String(_))
                            && set(&mut tree, &path, toml::Value::String(s.raw.clone())) =>
                        {
                            as_toml[i] = Some((message, inner));
                            continue;
                        }
                        // Wrong as text too. When the key takes no text at all, what was
                        // wrong with the TOML value says more (`integer -1, expected usize`
                        // beats `string "-1", expected usize`); else the text's own error
                        // does (`"-1" is not a size`).
                        Some((m, i)) if inner.starts_with("invalid type: string") => {
                            (message, inner) = (m.clone(), i.clone());
                        }
                        _ => {}
                    }
                }
                let set_by = set_by.map(|i| &settings[i]);
                let from = match set_by {
                    Some(s) => format!(" (set by {})", s.var),
                    None => String::new(),
                };
                let mut line = format!("{}: {message}{from}", key_path(&path));
                if let Some(hint) = hint(&inner).filter(|_| !inner.starts_with("unknown field")) {
                    line.push_str(&format!("\n    hint: {hint}"));
                }
                problems.push(line);
                // Drop the bad key so the rest of the tree is checked too; a key that cannot
                // be dropped (a missing one) ends the search.
                if !remove(&mut tree, &path) {
                    break;
                }
            }
        }
    }
    if let Some(c) = &mut config {
        read_password_envs(c, &env, &mut problems);
    }
    match config {
        Some(c) if problems.is_empty() => match c.validate() {
            Ok(()) => Ok(c),
            Err(p) => Err(LoadError::Invalid {
                path: origin.to_owned(),
                problems: p,
            }),
        },
        _ => Err(LoadError::Invalid {
            path: origin.to_owned(),
            problems: Problems(problems),
        }),
    }
}

/// Fills `password` from the variable `password_env` names, for every upstream and
/// repository credentials that name one.
fn read_password_envs(config: &mut Config, env: &[(String, String)], problems: &mut Vec<String>) {
    for (name, u) in &mut config.upstreams {
        let key = key_path(&["upstreams".to_owned(), name.clone()]);
        let slots = std::iter::once((key.clone(), &u.password_env, &mut u.password)).chain(
            u.credentials.iter_mut().enumerate().map(|(i, c)| {
                (
                    format!("{key}.credentials[{i}]"),
                    &c.password_env,
                    &mut c.password,
                )
            }),
        );
        for (at, var, password) in slots {
            let Some(var) = var else { continue };
            if password.is_some() {
                problems.push(format!("{at}: set password or password_env, not both"));
                continue;
            }
            match env.iter().find(|(k, _)| k == var) {
                Some((_, v)) => *password = Some(v.as_str().into()),
                None => problems.push(format!("{at}.password_env: the variable {var} is not set")),
            }
        }
    }
}

/// Key paths in a config file's text that hold secrets: passwords, tokens, and proxy URLs
/// with credentials.
pub fn secrets_in(text: &str) -> Vec<String> {
    fn walk(v: &toml::Value, path: &mut Vec<String>, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    path.push(k.clone());
                    let secret = match v {
                        toml::Value::String(s) => {
                            matches!(
                                k.as_str(),
                                "password" | "token" | "secret" | "secret_access_key"
                            ) || (k == "proxy" && s.contains('@'))
                        }
                        _ => false,
                    };
                    if secret {
                        out.push(key_path(path));
                    } else {
                        walk(v, path, out);
                    }
                    path.pop();
                }
            }
            toml::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    path.push(i.to_string());
                    walk(v, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(t) = toml::from_str::<toml::Table>(text) {
        walk(&toml::Value::Table(t), &mut Vec::new(), &mut out);
    }
    out
}

/// A variable's value: TOML when it is a TOML value (`true`, `42`, `["a", "b"]`), else text.
fn env_value(raw: &str) -> toml::Value {
    #[derive(serde::Deserialize)]
    struct V {
        v: toml::Value,
    }
    match toml::from_str::<V>(&format!("v = {raw}")) {
        Ok(V { v }) => v,
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

/// Sets `value` at the key path named by `segments`, creating tables on the way, and returns
/// the path used. A segment matches an existing key when they are equal ignoring case and
/// reading `.` and `-` as `_` (so `DOCKER_IO` finds the upstream `docker.io`); otherwise it
/// becomes a new lowercase key.
fn overlay(tree: &mut toml::Table, segments: &[&str], value: toml::Value) -> Vec<String> {
    let mut path = Vec::new();
    let mut table = tree;
    for (i, seg) in segments.iter().enumerate() {
        let key = table
            .keys()
            .find(|k| env_name(k) == seg.to_ascii_uppercase())
            .cloned()
            .unwrap_or_else(|| seg.to_ascii_lowercase());
        path.push(key.clone());
        if i + 1 == segments.len() {
            table.insert(key, value);
            break;
        }
        let entry = table
            .entry(key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        table = entry.as_table_mut().expect("made a table above");
    }
    path
}

/// How a key is spelled in a variable name: `docker.io` -> `DOCKER_IO`.
pub fn env_name(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '.' | '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// The value at `path`, mutably, if every step exists (array steps are indexes).
fn lookup<'a>(tree: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Value> {
    let (first, rest) = path.split_first()?;
    let mut v = tree.get_mut(first)?;
    for seg in rest {
        v = match v {
            toml::Value::Table(t) => t.get_mut(seg)?,
            toml::Value::Array(a) => a.get_mut(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

fn set(tree: &mut toml::Table, path: &[String], value: toml::Value) -> bool {
    match lookup(tree, path) {
        Some(v) => {
            *v = value;
            true
        }
        None => false,
    }
}

/// Removes the key (or array element) at `path`; false if there was none.
fn remove(tree: &mut toml::Table, path: &[String]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    if parent.is_empty() {
        tree.remove(last).is_some()
    } else {
        match lookup(tree, parent) {
            Some(toml::Value::Table(t)) => t.remove(last).is_some(),
            Some(toml::Value::Array(a)) => match last.parse::<usize>() {
                Ok(i) if i < a.len() => {
                    a.remove(i);
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// The key path of a deserialization error, and its message (with serde's "expected one of"
/// list of an unknown key replaced by a suggestion).
fn error_path(e: &serde_path_to_error::Error<toml::de::Error>) -> (Vec<String>, String) {
    use serde_path_to_error::Segment;
    let path = e
        .path()
        .iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(key.clone()),
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    let inner = e.inner().message();
    let message = match inner.split_once(", expected one of") {
        Some((head, expected)) if inner.starts_with("unknown field") => {
            let field = backticked(head).unwrap_or_default();
            let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            match closest(field, &known) {
                Some(k) => format!("unknown key; did you mean `{k}`?"),
                None => format!("unknown key; the keys here are {}", known.join(", ")),
            }
        }
        _ => inner.trim().to_owned(),
    };
    (path, message)
}

/// The first `quoted` word of a message.
fn backticked(s: &str) -> Option<&str> {
    let start = s.find('`')? + 1;
    let len = s[start..].find('`')?;
    Some(&s[start..start + len])
}

/// The known name closest to a mistyped one, if any is close enough to be what was meant.
pub fn closest<'a>(typo: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(typo, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// A key path as TOML spells it: `upstreams."docker.io".urls[0]`.
fn key_path(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if seg.chars().all(|c| c.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{seg}]"));
            continue;
        }
        if !out.is_empty() {
            out.push('.');
        }
        if !seg.is_empty()
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            out.push_str(seg);
        } else {
            out.push_str(&format!("{seg:?}"));
        }
    }
    if out.is_empty() {
        out.push_str("(top level)");
    }
    out
}

/// What a value of the kind an error names looks like.
fn hint(message: &str) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    // Before sizes: "expected usize" contains "size" too.
    if m.contains("expected usize") || m.contains("expected u32") {
        return Some("a whole number");
    }
    if m.contains("socket address") {
        Some("an IP address and port: \"0.0.0.0:5000\", \"127.0.0.1:9090\", \"[::]:5000\"")
    } else if m.contains("size") {
        Some("a number of bytes or a number with a unit: \"512MiB\", \"200GiB\", \"1.5TB\"")
    } else if m.contains("time unit") || m.contains("duration") || m.contains("expected number") {
        Some("a number with a unit: \"30s\", \"5m\", \"2h\", \"7days\"; \"0s\" for none")
    } else if m.contains("expected a boolean") {
        Some("true or false")
    } else if m.contains("expected a sequence") {
        Some("a list: [\"https://a.example\", \"https://b.example\"]")
    } else if m.contains("expected a string") {
        Some("text in double quotes")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn problems(text: &str, vars: &[(&str, &str)]) -> String {
        match load(text, Path::new("t.toml"), env(vars)) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn environment_overrides_the_file_and_finds_upstreams_by_env_name() {
        let c = load(
            super::super::DEFAULT_TOML,
            Path::new("<embedded>"),
            env(&[
                ("REGCACHE_LISTEN", "0.0.0.0:5999"),
                ("REGCACHE_CACHE__MAX_SIZE", "200GiB"),
                ("REGCACHE_CACHE__OFFLINE", "true"),
                ("REGCACHE_CACHE__TAG_TTL", "90s"),
                ("REGCACHE_UPSTREAMS__DOCKER_IO__USERNAME", "bob"),
                ("REGCACHE_UPSTREAMS__DOCKER_IO__PASSWORD", "12345"),
                ("REGCACHE_UPSTREAMS__GHCR_IO__USERNAME", "alice"),
                ("REGCACHE_UPSTREAMS__GHCR_IO__PASSWORD_ENV", "GHCR_TOKEN"),
                ("GHCR_TOKEN", "from-a-secret"),
                (
                    "REGCACHE_UPSTREAMS__CORP__URLS",
                    "https://registry.corp.example",
                ),
                (
                    "REGCACHE_UPSTREAMS__CORP__HOSTS",
                    "[\"corp.example\", \"corp\"]",
                ),
                ("REGCACHE_CONFIG", "/not/a/key"),
                ("OTHER_THING", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:5999".parse().unwrap());
        assert_eq!(c.cache.max_size, 200 << 30);
        assert!(c.cache.offline);
        assert_eq!(c.cache.tag_ttl, std::time::Duration::from_secs(90));
        let hub = &c.upstreams["docker.io"];
        assert_eq!(hub.username.as_deref(), Some("bob"));
        assert_eq!(
            hub.password.as_deref(),
            Some("12345"),
            "a number where text is wanted stays the variable's text"
        );
        assert_eq!(
            hub.urls,
            ["https://registry-1.docker.io"],
            "file value kept"
        );
        assert_eq!(c.upstreams["ghcr.io"].username.as_deref(), Some("alice"));
        assert_eq!(
            c.upstreams["ghcr.io"].password.as_deref(),
            Some("from-a-secret"),
            "password_env names the variable to read"
        );
        assert_eq!(c.upstreams["corp"].urls, ["https://registry.corp.example"]);
        assert_eq!(c.upstreams["corp"].hosts, ["corp.example", "corp"]);
    }

    #[test]
    fn every_bad_key_is_named_with_its_path_source_and_hint() {
        let text = r#"
            listen_addr = "0.0.0.0:5000"
            [cache]
            tag_tll = "5m"
            max_size = "12 parsecs"
            [upstreams."docker.io"]
            urls = ["https://registry-1.docker.io"]
            max_concurrent = "lots"
        "#;
        let all = problems(
            text,
            &[
                ("REGCACHE_CACHE__MAX_STALE", "forever"),
                ("REGCACHE_METRICS_LISTEN", "localhost"),
            ],
        );
        for needle in [
            "listen_addr: unknown key; did you mean `listen`?",
            "cache.tag_tll: unknown key; did you mean `tag_ttl`?",
            "cache.max_size: ",
            "\"200GiB\"",
            "cache.max_stale: ",
            "(set by REGCACHE_CACHE__MAX_STALE)",
            "\"5m\"",
            "upstreams.\"docker.io\".max_concurrent: invalid type: string \"lots\", expected usize\n    hint: a whole number",
            "metrics_listen: ",
            "(set by REGCACHE_METRICS_LISTEN)",
            "\"0.0.0.0:5000\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn a_variable_wrong_both_as_toml_and_as_text_is_named_once_with_what_was_expected() {
        let hub = "[upstreams.\"docker.io\"]\nurls = [\"https://registry-1.docker.io\"]\n";
        for (var, raw, needles) in [
            (
                "REGCACHE_CACHE__OFFLINE",
                "1",
                &[
                    "cache.offline: ",
                    "expected a boolean",
                    "hint: true or false",
                ][..],
            ),
            (
                "REGCACHE_CACHE__TAG_TTL",
                "300",
                &[
                    "cache.tag_ttl: ",
                    "expected a duration",
                    "hint: a number with a unit",
                ],
            ),
            (
                "REGCACHE_LISTEN",
                "5000",
                &["listen: ", "socket address", "hint: an IP address and port"],
            ),
            (
                "REGCACHE_UPSTREAMS__DOCKER_IO__MAX_CONCURRENT",
                "-1",
                &[
                    "upstreams.\"docker.io\".max_concurrent: ",
                    "expected usize",
                    "hint: a whole number",
                ],
            ),
            (
                "REGCACHE_CACHE__MAX_SIZE",
                "-1",
                &["cache.max_size: ", "not a size", "hint: a number of bytes"],
            ),
        ] {
            let all = problems(hub, &[(var, raw)]);
            let set_by = format!("(set by {var})");
            assert_eq!(all.matches(&set_by).count(), 1, "{var}={raw}:\n{all}");
            for needle in needles {
                assert!(
                    all.contains(needle),
                    "{var}={raw}: missing {needle:?} in:\n{all}"
                );
            }
        }
        // Every such variable is reported, and the file's own problems beside them.
        let all = problems(
            &format!("{hub}[cache]\ngc_interval = \"often\"\n"),
            &[
                ("REGCACHE_CACHE__OFFLINE", "1"),
                ("REGCACHE_CACHE__TAG_TTL", "300"),
                ("REGCACHE_LISTEN", "5000"),
            ],
        );
        for needle in [
            "cache.offline: ",
            "cache.tag_ttl: ",
            "listen: ",
            "cache.gc_interval: ",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn many_variables_read_again_as_text_do_not_use_up_the_problem_budget() {
        let mut text = String::from("default_upstream = \"u0\"\n");
        let mut vars = Vec::new();
        for i in 0..2 * MAX_PROBLEMS {
            text.push_str(&format!(
                "[upstreams.u{i}]\nurls = [\"https://u{i}.example\"]\n"
            ));
            vars.push((format!("REGCACHE_UPSTREAMS__U{i}__USERNAME"), i.to_string()));
        }
        let c = load(&text, Path::new("t.toml"), vars).unwrap();
        assert_eq!(c.upstreams["u63"].username.as_deref(), Some("63"));
    }

    #[test]
    fn an_unset_password_variable_is_named() {
        let all = problems(
            "[upstreams.a]\nurls = [\"https://a.example\"]\nusername = \"u\"\npassword_env = \"NOPE_UNSET\"\n",
            &[],
        );
        assert!(
            all.contains("upstreams.a.password_env: the variable NOPE_UNSET is not set"),
            "{all}"
        );
    }

    #[test]
    fn a_far_off_key_lists_the_keys_there() {
        let all = problems("[cache]\nzzz = 1\n", &[]);
        assert!(
            all.contains("cache.zzz: unknown key; the keys here are tag_ttl"),
            "{all}"
        );
    }

    #[test]
    fn a_malformed_variable_name_is_reported() {
        let all = problems("", &[("REGCACHE_CACHE____MAX_SIZE", "1")]);
        assert!(
            all.contains("REGCACHE_CACHE____MAX_SIZE: not a config key"),
            "{all}"
        );
    }

    #[test]
    fn secrets_are_found_by_key() {
        let text = "[upstreams.a]\nurls = [\"https://a\"]\nusername = \"u\"\npassword = \"p\"\nproxy = \"http://u:p@proxy:3128\"\n[[upstreams.a.credentials]]\nrepo_prefix = \"t\"\npassword = \"q\"\n[upstreams.b]\nurls = [\"https://b\"]\nproxy = \"http://proxy:3128\"\n";
        assert_eq!(
            secrets_in(text),
            [
                "upstreams.a.credentials[0].password",
                "upstreams.a.password",
                "upstreams.a.proxy"
            ]
        );
    }

    #[test]
    fn env_names() {
        assert_eq!(env_name("docker.io"), "DOCKER_IO");
        assert_eq!(env_name("my-registry.corp"), "MY_REGISTRY_CORP");
        assert_eq!(
            key_path(&[
                "upstreams".into(),
                "docker.io".into(),
                "urls".into(),
                "0".into()
            ]),
            "upstreams.\"docker.io\".urls[0]"
        );
    }
}
