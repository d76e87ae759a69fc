//! Status-page sessions: what the `imgcache_admin` cookie names. The cookie holds a random
//! session id, never the admin token: the token stays in this process, so a cookie that
//! leaks (a shared browser profile, a proxy log) grants nothing once its session ends, and
//! logging out ends it here, not only in the browser.
//!
//! Each request re-checks the session's token with [`crate::auth::check_admin`] (cached), so
//! an upstream token whose admin role is revoked loses the page too. Sessions live
//! [`SESSION_TTL`] from login, at most [`MAX_SESSIONS`] at once (the oldest goes first), and
//! none survives a restart.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once.
pub const MAX_SESSIONS: usize = 1024;

struct Session {
    token: String,
    created: Instant,
}

#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    /// A new session for `token` (already checked): its id, for the cookie. 244 random
    /// bits (two v4 UUIDs, from the OS's generator).
    pub fn start(&self, token: &str) -> String {
        let id = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut m = self.0.lock().expect("poisoned");
        m.retain(|_, s| s.created.elapsed() < SESSION_TTL);
        if m.len() >= MAX_SESSIONS
            && let Some(oldest) = m
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
        {
            m.remove(&oldest);
        }
        m.insert(
            id.clone(),
            Session {
                token: token.to_string(),
                created: Instant::now(),
            },
        );
        id
    }

    /// The token of a live session.
    pub fn token(&self, id: &str) -> Option<String> {
        let m = self.0.lock().expect("poisoned");
        m.get(id)
            .filter(|s| s.created.elapsed() < SESSION_TTL)
            .map(|s| s.token.clone())
    }

    /// Ends a session (log-out).
    pub fn end(&self, id: &str) {
        self.0.lock().expect("poisoned").remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_start_resolve_and_end() {
        let s = Sessions::default();
        let a = s.start("secret");
        let b = s.start("secret");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(!a.contains("secret"));
        assert_eq!(s.token(&a).as_deref(), Some("secret"));
        assert_eq!(s.token("nope"), None);
        s.end(&a);
        assert_eq!(s.token(&a), None);
        assert_eq!(s.token(&b).as_deref(), Some("secret"));
    }

    #[test]
    fn the_oldest_session_goes_first_when_full() {
        let s = Sessions::default();
        let first = s.start("t");
        for _ in 1..MAX_SESSIONS {
            s.start("t");
        }
        assert!(s.token(&first).is_some());
        s.start("t");
        assert_eq!(s.token(&first), None, "evicted for the newest");
    }
}
