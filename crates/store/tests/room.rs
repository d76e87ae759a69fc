//! Room reservations under the size limit (`Cache::reserve`), on both drivers.

mod common;

use imgcache_store::{Cache, DriverKind, Key, Room};

fn cached(cache: &Cache) -> Vec<String> {
    let mut v: Vec<_> = cache
        .get_cached_images()
        .unwrap()
        .into_iter()
        .map(|r| r.image_id)
        .collect();
    v.sort();
    v
}

#[test]
fn reservations_never_pass_the_limit_and_evict_only_what_helps() {
    for kind in [DriverKind::Sqlite, DriverKind::Xattr] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let cache = Cache::open(dir.path(), kind).unwrap();
        common::publish(&cache, "old", &[7u8; 40]);
        common::publish(&cache, "new", &[7u8; 40]);
        // 100 bytes: 80 cached, 20 free.
        let a = match cache.reserve(20, 100).unwrap() {
            Room::Reserved(r) => r,
            other => panic!("{other:?}"),
        };
        assert!(a.evicted.is_empty(), "{kind:?}: it fitted");
        // Larger than the limit: refused, nothing evicted.
        assert!(matches!(
            cache.reserve(101, 100).unwrap(),
            Room::TooLarge { .. }
        ));
        assert_eq!(cached(&cache), ["new", "old"], "{kind:?}");
        // 30 more: only by evicting "old" (the least recently used), which is done.
        let b = match cache.reserve(30, 100).unwrap() {
            Room::Reserved(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(b.evicted, [("old".to_string(), 40)], "{kind:?}");
        assert_eq!(cached(&cache), ["new"]);
        // "new" in use and 50 reserved: 40 more cannot fit without it, nothing evicted.
        let reader = cache.open_for_read(&Key::new("new").unwrap()).unwrap();
        assert!(matches!(cache.reserve(40, 100).unwrap(), Room::Full { .. }));
        assert_eq!(cached(&cache), ["new"], "{kind:?}: in use, kept");
        drop(reader);
        // Dropped reservations give their room back.
        drop(a);
        drop(b);
        let mut c = match cache.reserve(10, 100).unwrap() {
            Room::Reserved(r) => r,
            other => panic!("{other:?}"),
        };
        // A growing reservation: up to what is left, then no further.
        assert!(c.grow(&cache, 50, 100).unwrap());
        assert_eq!(c.bytes(), 60);
        // One more byte only fits by evicting "new" (no longer in use).
        assert!(c.grow(&cache, 1, 100).unwrap());
        assert!(cached(&cache).is_empty(), "{kind:?}");
        // Past the limit itself: refused, the reservation unchanged.
        assert!(!c.grow(&cache, 40, 100).unwrap());
        assert_eq!(c.bytes(), 61);
    }
}
