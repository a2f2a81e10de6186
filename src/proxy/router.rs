//! Which upstream and repository a client's name means: containerd's `ns` first, then aliases,
//! then a registry named by the first path component, then an upstream named by it, else the
//! default upstream. Docker Hub's one-component names get `library/`.

use std::collections::HashMap;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::oci::image_ref::{Name, canonical_registry};
use crate::oci::reference::{NameError, RepoName};

/// Where a name goes, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream: String,
    pub repo: RepoName,
    /// The rule that decided, for `regcache resolve` and debug logs.
    pub why: String,
}

/// The routing table built from the config.
pub struct Router {
    /// Route name (upstream name or registry host, lowercase) -> upstream name.
    routes: HashMap<String, String>,
    aliases: HashMap<String, (String, RepoName)>,
    /// Upstream name -> namespace for one-component names.
    short_name_prefixes: HashMap<String, String>,
    default_upstream: String,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        let mut routes = HashMap::new();
        let mut short_name_prefixes = HashMap::new();
        for (name, cfg) in &config.upstreams {
            for r in config.route_names(name, cfg) {
                routes.insert(r, name.clone());
            }
            if let Some(p) = config.short_name_prefix(name) {
                short_name_prefixes.insert(name.clone(), p.to_owned());
            }
        }
        let aliases = config
            .aliases
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), config.resolve_alias_target(v).ok()?)))
            .collect();
        Router {
            routes,
            aliases,
            short_name_prefixes,
            default_upstream: config.default_upstream.clone(),
        }
    }

    /// The alias a name means: the name itself, or (as Docker's mirror traffic sends short
    /// names) the default upstream's `library/` form of it.
    fn alias<'a>(&'a self, name: &'a Name) -> Option<(&'a str, &'a (String, RepoName))> {
        let n = name.as_str();
        if let Some(a) = self.aliases.get(n) {
            return Some((n, a));
        }
        let prefix = self.short_name_prefixes.get(&self.default_upstream)?;
        let short = n.strip_prefix(prefix.as_str())?.strip_prefix('/')?;
        if short.contains('/') {
            return None;
        }
        self.aliases.get(short).map(|a| (short, a))
    }

    pub fn route(&self, name: &Name, ns: Option<&str>) -> Result<Route> {
        let to = |up: &str, repo: &RepoName, why: String| -> Result<Route> {
            let repo = match self.short_name_prefixes.get(up) {
                Some(prefix) if repo.components().count() == 1 => repo
                    .prefixed(prefix)
                    .map_err(|e| Error::NameInvalid(e.to_string()))?,
                _ => repo.clone(),
            };
            Ok(Route {
                upstream: up.to_owned(),
                repo,
                why,
            })
        };
        let unknown = |registry: &str| {
            Error::NameUnknown(format!(
                "no upstream is configured for registry {registry:?}"
            ))
        };
        if let Some(ns) = ns {
            // containerd names the registry in `ns`; the whole path is the repository.
            let up = self
                .routes
                .get(&canonical_registry(ns))
                .ok_or_else(|| unknown(ns))?;
            let repo = name
                .whole()
                .ok_or_else(|| Error::NameInvalid(format!("{name} is not a repository path")))?;
            return to(
                up,
                repo,
                format!("containerd ns={ns} names upstream {up:?}"),
            );
        }
        if let Some((alias, (up, repo))) = self.alias(name) {
            return to(up, repo, format!("alias {alias:?}"));
        }
        if let Some((registry, repo)) = name.registry() {
            let up = self.routes.get(registry).ok_or_else(|| unknown(registry))?;
            return to(
                up,
                repo,
                format!("registry {registry:?} in the path is upstream {up:?}"),
            );
        }
        let whole = name
            .whole()
            .ok_or_else(|| Error::NameInvalid(name.to_string()))?;
        if let Some((first, rest)) = whole.as_str().split_once('/')
            && let Some(up) = self.routes.get(first)
        {
            let repo: RepoName = rest
                .parse()
                .map_err(|e: NameError| Error::NameInvalid(e.to_string()))?;
            return to(
                up,
                &repo,
                format!("path prefix {first:?} names upstream {up:?}"),
            );
        }
        let up = &self.default_upstream;
        to(
            up,
            whole,
            format!("no registry named, so the default upstream {up:?}"),
        )
    }
}
