//! Request path + query -> route: never panics, and whatever parses is safe to use as a
//! file path or upstream URL (valid components, no `..`, no NUL).
#![no_main]

use libfuzzer_sys::fuzz_target;
use regcache::oci::route::{Request, Route};

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let Ok(req) = Request::parse(path, query) else {
        return;
    };
    let name = match &req.route {
        Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::Upload { name }
        | Route::TagsList { name }
        | Route::Referrers { name, .. } => name.as_str(),
        Route::Base | Route::Catalog => return,
    };
    for c in name.split('/') {
        assert!(!c.is_empty() && c != "." && c != "..", "{name:?}");
    }
    assert!(!name.contains(['\0', '\\', '%', '?', '#']), "{name:?}");
    if let Route::Manifest { reference, .. } = &req.route {
        let r = reference.to_string();
        assert!(!r.contains(['/', '\0', '%']), "{r:?}");
    }
});
