//! An axum app served on 127.0.0.1 by its own tokio runtime on its own thread, so that sync
//! tests (and async ones, on another runtime) can start it. Dropping the handle stops it and
//! joins the thread.

use std::net::SocketAddr;
use std::thread::JoinHandle;

use axum::Router;
use tokio::sync::oneshot;

pub struct Background {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Binds 127.0.0.1:0 and serves `app` until dropped. `make` builds the app inside the
    /// runtime (it may need the runtime, e.g. for tasks) and gets the server's own base URL.
    pub fn start(name: &str, make: impl FnOnce(String) -> Router + Send + 'static) -> Background {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = make(format!("http://{addr}"));
                    // Not graceful: a client's pooled keep-alive connection must not delay
                    // the stop. Dropping the runtime closes every connection.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                });
                // Open connections (a client mid-download) must not keep the thread alive.
                rt.shutdown_background();
            })
            .expect("spawn server thread");
        Background {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
