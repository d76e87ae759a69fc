//! Fuzz key parsing (`Key::new`): never panics, and every accepted key is a safe file name:
//! 1-255 bytes of `[A-Za-z0-9._-]`, no leading dot (so never `.` or `..`), not one of the
//! store's directories, and it round-trips.
#![no_main]

use imgcache_store::Key;
use imgcache_store::key::RESERVED;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(s) = std::str::from_utf8(input) else {
        let _ = Key::new(String::from_utf8_lossy(input));
        return;
    };
    if let Ok(k) = Key::new(s) {
        assert_eq!(k.as_str(), s);
        assert!(!s.is_empty() && s.len() <= 255);
        assert!(!s.starts_with('.'));
        assert!(!s.contains('/') && !s.contains('\0'));
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        );
        assert!(!RESERVED.contains(&s));
        let p = std::path::Path::new("/root").join(k.as_str());
        assert_eq!(p.parent(), Some(std::path::Path::new("/root")));
    }
});
