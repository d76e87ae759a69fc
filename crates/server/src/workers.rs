//! Background work (to be written): prefetcher, pruner, cleaner.

use crate::state::AppState;

pub struct Workers;

pub fn spawn(_state: AppState) -> Workers {
    Workers
}

impl Workers {
    pub async fn stop(self) {}
}
