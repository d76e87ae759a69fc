//! `imgcache serve`: serves images from the cache (one origin download per image, every
//! waiting client streamed while it runs), Glance's `/v2/cache` management API, background
//! prefetch/prune/clean, and Prometheus metrics.

pub mod auth;
pub mod cache_api;
pub mod conditional;
pub mod config;
pub mod error;
pub mod fill;
pub mod fleet_node;
pub mod health;
pub mod images;
pub mod metrics;
pub mod observe;
pub mod peer;
pub mod peer_fill;
pub mod process;
pub mod proxy;
pub mod public_url;
pub mod range;
pub mod relay;
pub mod representation;
pub mod revalidate;
pub mod router;
pub mod schemas;
pub mod sendfile;
pub mod serve_file;
pub mod state;
pub mod ui;
pub mod upstream_auth;
pub mod verify_stream;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use config::ServerConfig;
pub use error::ApiError;
pub use state::AppState;

/// Longest a TLS client may take over its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (hyper answers 431 beyond it).
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Runs the server on `config.listen` until `shutdown` resolves (see [`Server::bind`] and
/// [`Server::serve`]).
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::bind(config).await?.serve(shutdown).await
}

/// Runs the server on an already bound listener until `shutdown` resolves (see
/// [`Server::on`] and [`Server::serve`]).
pub async fn run_on(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::on(listener, config).await?.serve(shutdown).await
}

/// A server that is ready: its TLS files loaded, its cache open, its socket bound (and, in
/// fleet mode, the fleet joined). Whatever can fail at start has failed by the time one
/// exists, so a caller announces "serving" (or tells systemd `READY=1`) only once it holds
/// one; [`Server::serve`] then only accepts.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Server {
    /// Loads TLS, opens the cache, binds `config.listen` and joins the fleet, in that order.
    /// `config.listen` is `HOST:PORT`: an IP (`[::1]:9292` for IPv6) or a host name, which is
    /// resolved; the first of its addresses that binds is used ([`Server::local_addr`]).
    pub async fn bind(config: ServerConfig) -> anyhow::Result<Server> {
        let (tls, state) = prepare(config)?;
        let listen = state.config.listen.clone();
        let listener = TcpListener::bind(listen.as_str())
            .await
            .with_context(|| format!("listen on {listen}"))?;
        Server::finish(listener, state, tls).await
    }

    /// [`Server::bind`] on an already bound listener (`config.listen` is then unused).
    pub async fn on(listener: TcpListener, config: ServerConfig) -> anyhow::Result<Server> {
        let (tls, state) = prepare(config)?;
        Server::finish(listener, state, tls).await
    }

    async fn finish(
        listener: TcpListener,
        mut state: AppState,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> anyhow::Result<Server> {
        if let Some(fleet) = state.config.fleet.clone() {
            // Joining is part of starting: a node whose URL a live node already uses is
            // refused.
            let http = state.fetcher.http_source()?;
            let node = fleet_node::FleetNode::start(fleet, state.cache.clone(), &http)
                .await
                .context("joining the fleet")?;
            state.fleet = Some(node);
        }
        Ok(Server {
            listener,
            state,
            tls,
        })
    }

    /// The address the socket is bound to (the port the system chose for port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves until `shutdown` resolves, then: stops accepting, lets in-flight responses
    /// finish for up to `shutdown_grace`, cuts what is left, aborts downloads still running
    /// (their files go to `invalid/`: nothing partial is ever published) and stops the
    /// background workers.
    ///
    /// Connections are served by hyper-util's auto builder (HTTP/1.1 and HTTP/2), with a
    /// header read timeout against slowloris clients and a bound on the request head; with a
    /// certificate configured, over TLS (rustls, ring provider).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server {
            listener,
            state,
            tls,
        } = self;
        serve_on(listener, state, tls, shutdown).await
    }
}

/// What can fail before the socket matters: the TLS files, then the cache.
fn prepare(config: ServerConfig) -> anyhow::Result<(Option<tokio_rustls::TlsAcceptor>, AppState)> {
    // The CLI's parsers refuse these too; a config built in code is checked here.
    if let Some(f) = &config.fleet
        && f.peer_fanout == 0
    {
        bail!("peer_fanout is 0: a fleet node must serve at least 1 peer at once");
    }
    for (name, d) in [
        ("prune_interval", config.prune_interval),
        ("clean_interval", config.clean_interval),
        ("header_read_timeout", config.header_read_timeout),
    ] {
        if d.is_zero() {
            bail!("{name} is 0s: it must be more than 0s");
        }
    }
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        (None, None) => None,
        _ => bail!("TLS needs both a certificate and a key"),
    };
    let state = AppState::new(config)?;
    Ok((tls, state))
}

async fn serve_on(
    listener: TcpListener,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cfg = state.config.clone();
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %addr, tls = tls.is_some(), "serving on {scheme}://{addr}");
    let workers = workers::spawn(state.clone());
    let service = TowerToHyperService::new(router::router(state.clone()));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        // The queued write strategy hands body buffers to the IO uncopied, which the
        // sendfile path relies on (see `sendfile`).
        .writev(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let builder = Arc::new(builder);

    let graceful = GracefulShutdown::new();
    let mut conns: JoinSet<()> = JoinSet::new();
    let shutdown = shutdown;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let builder = builder.clone();
                let service = service.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                conns.spawn(async move {
                    let result = match tls {
                        None => {
                            // Plain TCP: hits on HTTP/1 go out with sendfile.
                            let io = sendfile::SendfileStream::new(tcp);
                            let service = PerConnection {
                                inner: service,
                                client: peer,
                                sendfile: Some(io.handle()),
                            };
                            let conn = builder.serve_connection(TokioIo::new(io), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Some(acceptor) => {
                            let stream = match tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                acceptor.accept(tcp),
                            )
                            .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let service = PerConnection {
                                inner: service,
                                client: peer,
                                sendfile: None,
                            };
                            let conn = builder.serve_connection(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!(grace = ?cfg.shutdown_grace, "shutting down: no new connections");
    if tokio::time::timeout(cfg.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over: cutting the remaining connections");
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    state.fills.abort_all(Duration::from_secs(30)).await;
    workers.stop().await;
    Ok(())
}

/// Puts what a connection knows into the extensions of its requests: the client's address
/// ([`observe::ClientAddr`]), and on plain TCP the [`sendfile::Sendfile`] handle, for HTTP/1
/// requests only (never HTTP/2: its frames must carry real bytes).
#[derive(Clone)]
struct PerConnection<S> {
    inner: S,
    client: SocketAddr,
    sendfile: Option<sendfile::Sendfile>,
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for PerConnection<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: hyper::Request<B>) -> Self::Future {
        req.extensions_mut()
            .insert(observe::ClientAddr(self.client));
        if let Some(handle) = &self.sendfile
            && req.version() <= hyper::Version::HTTP_11
        {
            req.extensions_mut().insert(handle.clone());
        }
        self.inner.call(req)
    }
}

/// The address a listener is bound to, for callers that bound port 0.
pub fn local_addr(listener: &TcpListener) -> anyhow::Result<SocketAddr> {
    Ok(listener.local_addr()?)
}

/// A TLS acceptor from PEM files: the certificate chain and its private key.
fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        bail!("TLS certificate {}: no certificate found", cert.display());
    }
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("TLS key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// The most threads of tokio's blocking pool a server runtime should allow: every blocking
/// call of the server is short (a record lookup, a pread of an uncached page, a rename);
/// what runs for a download's whole length has a thread of its own.
pub const MAX_BLOCKING_THREADS: usize = 64;
