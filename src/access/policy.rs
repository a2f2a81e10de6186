//! Repository patterns and the allow/deny policy on resolved routes (upstream + repository as
//! the upstream names it). Pure: no I/O.
//!
//! Patterns match repository paths component by component: `*` inside a component matches any
//! run of characters except `/` (`library/*`, `team/app-*`); a component that is exactly `**`
//! matches zero or more whole components (`myorg/**` covers `myorg`, `myorg/a`, `myorg/a/b`).

use std::collections::HashMap;
use std::fmt;

/// A repository glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    parts: Vec<String>,
}

impl Pattern {
    /// Parses a pattern; an empty pattern or an empty component is an error.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("an empty pattern".into());
        }
        let parts: Vec<String> = t.split('/').map(str::to_owned).collect();
        if parts.iter().any(String::is_empty) {
            return Err(format!("{text:?} has an empty path component"));
        }
        if let Some(bad) = parts
            .iter()
            .find(|p| p.contains("**") && p.as_str() != "**")
        {
            return Err(format!(
                "{text:?}: `**` must be a whole component (in {bad:?})"
            ));
        }
        if let Some(bad) = parts.iter().find(|p| {
            !p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-*".contains(c))
        }) {
            return Err(format!(
                "{text:?}: component {bad:?} may hold only lowercase letters, digits, `.`, `_`, `-` and `*`"
            ));
        }
        Ok(Pattern {
            text: t.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the repository path matches.
    pub fn matches(&self, repo: &str) -> bool {
        let comps: Vec<&str> = repo.split('/').collect();
        match_parts(&self.parts, &comps)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn match_parts(pat: &[String], comps: &[&str]) -> bool {
    match pat.split_first() {
        None => comps.is_empty(),
        Some((p, rest)) if p == "**" => (0..=comps.len()).any(|k| match_parts(rest, &comps[k..])),
        Some((p, rest)) => match comps.split_first() {
            Some((c, more)) => {
                match_component(p.as_bytes(), c.as_bytes()) && match_parts(rest, more)
            }
            None => false,
        },
    }
}

/// `*` matches any run (possibly empty) inside one component.
fn match_component(p: &[u8], c: &[u8]) -> bool {
    match p.split_first() {
        None => c.is_empty(),
        Some((b'*', rest)) => (0..=c.len()).any(|k| match_component(rest, &c[k..])),
        Some((x, rest)) => c.first() == Some(x) && match_component(rest, &c[1..]),
    }
}

/// A pattern and the config key it came from (`upstreams."docker.io".deny[0]`), which a
/// denial names.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub pattern: Pattern,
}

/// Allow and deny lists per upstream.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Upstream name -> lists that apply to it (top-level `[policy]` entries naming it, and the
    /// upstream's own `allow` / `deny`).
    by_upstream: HashMap<String, Lists>,
    /// Whether `[policy] allow` is non-empty: then it gates every upstream.
    global_allow: bool,
    /// The keys of the allow lists, for the message when nothing allows a repository.
    allow_keys: HashMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default)]
struct Lists {
    allow: Vec<Entry>,
    deny: Vec<Entry>,
}

impl Policy {
    /// Makes an empty policy; `global_allow` says `[policy] allow` is non-empty, so upstreams
    /// with no allow entry of their own are closed.
    pub fn new(global_allow: bool) -> Policy {
        Policy {
            global_allow,
            ..Policy::default()
        }
    }

    pub fn allow(&mut self, upstream: &str, entry: Entry) {
        let keys = self.allow_keys.entry(upstream.to_owned()).or_default();
        let list = entry
            .key
            .rsplit_once('[')
            .map_or(entry.key.as_str(), |(k, _)| k);
        if !keys.iter().any(|k| k == list) {
            keys.push(list.to_owned());
        }
        self.by_upstream
            .entry(upstream.to_owned())
            .or_default()
            .allow
            .push(entry);
    }

    pub fn deny(&mut self, upstream: &str, entry: Entry) {
        self.by_upstream
            .entry(upstream.to_owned())
            .or_default()
            .deny
            .push(entry);
    }

    /// Whether any list applies to anything.
    pub fn is_empty(&self) -> bool {
        !self.global_allow
            && self
                .by_upstream
                .values()
                .all(|l| l.allow.is_empty() && l.deny.is_empty())
    }

    /// `Err(why)` names the rule that refuses `repo` on `upstream`. A deny entry beats every
    /// allow entry; where any allow list applies, one of its patterns must match.
    pub fn check(&self, upstream: &str, repo: &str) -> Result<(), String> {
        let lists = self.by_upstream.get(upstream);
        if let Some(e) = lists.and_then(|l| l.deny.iter().find(|e| e.pattern.matches(repo))) {
            return Err(format!(
                "{upstream}/{repo} is denied by {} = {:?}",
                e.key,
                e.pattern.as_str()
            ));
        }
        let allows = lists.map_or(&[][..], |l| &l.allow[..]);
        if allows.is_empty() && !self.global_allow {
            return Ok(());
        }
        if allows.iter().any(|e| e.pattern.matches(repo)) {
            return Ok(());
        }
        let keys = match self.allow_keys.get(upstream) {
            Some(k) => k.join(", "),
            None => "policy.allow".to_owned(),
        };
        Err(format!(
            "{upstream}/{repo} is not in any allow list ({keys})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, r: &str) -> bool {
        Pattern::parse(p).unwrap().matches(r)
    }

    #[test]
    fn globs() {
        assert!(m("library/*", "library/alpine"));
        assert!(!m("library/*", "library/a/b"));
        assert!(!m("library/*", "library"));
        assert!(m("team/**", "team"));
        assert!(m("team/**", "team/a"));
        assert!(m("team/**", "team/a/b/c"));
        assert!(!m("team/**", "teams/a"));
        assert!(m("**", "anything/at/all"));
        assert!(m("team/app-*", "team/app-web"));
        assert!(m("team/app-*", "team/app-"));
        assert!(!m("team/app-*", "team/ap"));
        assert!(m("**/secret", "a/b/secret"));
        assert!(m("*/x/**", "a/x"));
        assert!(!m("*/x/**", "a/y/x"));
        assert!(m("library/alpine", "library/alpine"));
        assert!(!m("library/alpine", "library/alpine2"));
    }

    #[test]
    fn bad_patterns() {
        for bad in ["", "a//b", "/a", "a/**x", "Team/*", "a b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn entry(key: &str, p: &str) -> Entry {
        Entry {
            key: key.into(),
            pattern: Pattern::parse(p).unwrap(),
        }
    }

    #[test]
    fn deny_beats_allow_and_allow_lists_gate() {
        let mut p = Policy::new(false);
        p.allow("hub", entry("upstreams.\"hub\".allow[0]", "library/*"));
        p.allow("hub", entry("policy.allow[1]", "team/**"));
        p.deny("hub", entry("upstreams.\"hub\".deny[0]", "library/evil*"));
        assert!(p.check("hub", "library/alpine").is_ok());
        assert!(p.check("hub", "team/a/b").is_ok());
        let e = p.check("hub", "library/evilbox").unwrap_err();
        assert!(
            e.contains("upstreams.\"hub\".deny[0]") && e.contains("library/evil*"),
            "{e}"
        );
        let e = p.check("hub", "other/x").unwrap_err();
        assert!(
            e.contains("not in any allow list (upstreams.\"hub\".allow, policy.allow)"),
            "{e}"
        );
        // No list for this upstream, no global allow list: open.
        assert!(p.check("ghcr", "x/y").is_ok());
        let mut g = Policy::new(true);
        g.allow("hub", entry("policy.allow[0]", "library/*"));
        assert!(g.check("hub", "library/a").is_ok());
        assert!(g.check("ghcr", "x/y").unwrap_err().contains("policy.allow"));
    }
}
