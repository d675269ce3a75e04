//! NbdUri::parse on arbitrary text; whatever parses must render (Display)
//! to a string that parses back to the same value, and rendering is stable.
use nbd_core::NbdUri;

/// The `uri` target's check: call it with one input.
pub fn check(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = nbd_core::uri::is_nbd_uri(s);
    let Ok(u) = NbdUri::parse(s) else {
        return;
    };
    let shown = u.to_string();
    let again = NbdUri::parse(&shown)
        .unwrap_or_else(|e| panic!("{s:?} parsed, but its rendering {shown:?} does not: {e}"));
    assert_eq!(u, again, "{s:?} -> {shown:?} parses to a different value");
    assert_eq!(shown, again.to_string(), "rendering is not stable");
}
