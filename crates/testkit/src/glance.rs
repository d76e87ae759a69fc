//! A fake Glance v2 behind a fake keystonemiddleware, for tests that drive real clients
//! (python-glanceclient, openstacksdk, Ironic) through imgcache or straight at it.
//!
//! It behaves like a real glance-api with `auth_strategy = keystone`:
//! - Three tokens are valid: [`ADMIN_TOKEN`] (role admin, project [`ADMIN_PROJECT`]),
//!   [`MEMBER_TOKEN`] (role member, project [`MEMBER_PROJECT`]) and [`OTHER_TOKEN`] (role
//!   member, project [`OTHER_PROJECT`]). Any other or missing
//!   `X-Auth-Token` gets keystonemiddleware's 401: its JSON body and
//!   `WWW-Authenticate: Keystone uri="..."`. Only `/` and `/versions` are unauthenticated
//!   (glance-api-paste's `apiversions` app is outside the auth pipeline).
//! - Every response carries `X-Openstack-Request-Id: req-<uuid>`.
//! - `/versions` (200) and `/` (300) list Glance's versions with absolute links to this
//!   server, as `glance/api/versions.py` builds them (no image cache configured).
//! - `/v2/schemas/image` is the schema python-glanceclient ships (`_BASE_SCHEMA`), read from
//!   the installed client at start (with `os_hash_algo`/`os_hash_value`'s `maxLength` set
//!   to Glance's 64/128: the client's copy says 32, which no sha512 fits);
//!   `/v2/schemas/images` wraps it as Glance's `CollectionSchema` does. Without python3 or glanceclient [`FakeGlance::start`] fails,
//!   and tests skip.
//! - Image records, lists, create, update (json-patch), upload (streamed to a temp file,
//!   hashed on the way: md5 `checksum`, sha512 `os_hash_value`), download (Glance's headers:
//!   `Content-MD5` hex, `Content-Length`, octet-stream; 204 without data; `Range`), delete,
//!   deactivate/reactivate, and `GET /v2/info/stores/detail` (admin only), with Glance's
//!   status codes and webob-style error bodies. Another project's private image is 404.
//!
//! Counters for tests: data requests per image id, upload bytes received, requests per
//! (method, path class) where the class replaces uuid segments by `{id}`, and when each
//! image's data was last sent to its end. Knobs for tests: an image's data sent slowly
//! ([`Seed::throttle`]), cut mid-body ([`Seed::die_after`]) or not matching its record's
//! checksums ([`Seed::wrong_checksums`]), and every download failing with a 503 while
//! [`FakeGlance::set_failing`] (a store backend that is down).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::StreamExt;
use md5::Md5;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha512};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::background::Background;

/// A token with the admin role.
pub const ADMIN_TOKEN: &str = "fake-glance-admin-token";
/// A token with the member role in [`MEMBER_PROJECT`].
pub const MEMBER_TOKEN: &str = "fake-glance-member-token";
/// A token with the member role in [`OTHER_PROJECT`] (a stranger to the member's images).
pub const OTHER_TOKEN: &str = "fake-glance-other-token";
pub const ADMIN_PROJECT: &str = "4f1e4c0e6bd84b0c9e0f6d0a4d1f0a01";
pub const MEMBER_PROJECT: &str = "9b3d2c1a0f9e4d8c8b7a6f5e4d3c2b02";
pub const OTHER_PROJECT: &str = "7c5e1f0a2b3d4c6e8f9a0b1c2d3e4f03";
/// Where the fake's 401s send clients (keystonemiddleware's `www_authenticate_uri`).
pub const KEYSTONE_URI: &str = "http://keystone.invalid:5000/v3";

/// Why the fake cannot start (tests print it and skip).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The running fake; dropped = stopped.
pub struct FakeGlance {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub state: Arc<GlanceState>,
    _server: Background,
}

/// One stored image.
#[derive(Clone, Debug)]
struct Image {
    rec: Map<String, Value>,
    data: Option<PathBuf>,
    pace: Pace,
}

/// How a body is sent: `chunk` bytes at a time, `delay` apart, cut (an error: the connection
/// is reset) once the offset `die_after` is reached.
#[derive(Clone, Debug)]
pub(crate) struct Pace {
    pub chunk: usize,
    pub delay: Duration,
    pub die_after: Option<u64>,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            chunk: 256 * 1024,
            delay: Duration::ZERO,
            die_after: None,
        }
    }
}

/// The fake's state, shared with tests through [`FakeGlance`]'s methods.
pub struct GlanceState {
    images: Mutex<BTreeMap<String, Image>>,
    dir: tempfile::TempDir,
    schemas: Schemas,
    data_requests: Mutex<HashMap<String, usize>>,
    body_end: Arc<Mutex<HashMap<String, Instant>>>,
    requests: Mutex<Vec<Logged>>,
    upload_bytes: AtomicU64,
    seq: AtomicU64,
    failing: AtomicBool,
}

struct Schemas {
    image: Value,
    images: Value,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The path with uuid segments replaced by `{id}`.
    pub class: String,
    pub token: Option<String>,
    pub status: u16,
}

/// What [`seed`] adds: fields default as an admin-created, public, active raw/bare image.
#[derive(Clone, Debug)]
pub struct Seed {
    pub id: Option<String>,
    pub name: String,
    pub owner: String,
    pub visibility: String,
    pub disk_format: String,
    pub container_format: String,
    pub status: String,
    pub os_hidden: bool,
    pub protected: bool,
    pub properties: Map<String, Value>,
    /// `None`: a queued image without data.
    pub data: Option<Vec<u8>>,
    pace: Pace,
    wrong_checksums: bool,
}

impl Seed {
    pub fn new(name: &str, data: impl Into<Vec<u8>>) -> Seed {
        Seed {
            id: None,
            name: name.to_string(),
            owner: ADMIN_PROJECT.to_string(),
            visibility: "public".to_string(),
            disk_format: "raw".to_string(),
            container_format: "bare".to_string(),
            status: "active".to_string(),
            os_hidden: false,
            protected: false,
            properties: Map::new(),
            data: Some(data.into()),
            pace: Pace::default(),
            wrong_checksums: false,
        }
    }
    /// Its data sent `chunk` bytes at a time, `delay` apart.
    pub fn throttle(mut self, chunk: usize, delay: Duration) -> Seed {
        self.pace.chunk = chunk.max(1);
        self.pace.delay = delay;
        self
    }
    /// Its downloads cut (the connection reset) once `n` bytes of it are sent.
    pub fn die_after(mut self, n: u64) -> Seed {
        self.pace.die_after = Some(n);
        self
    }
    /// A record whose `checksum` and `os_hash_value` are not its data's (zeros): a store
    /// that lost or corrupted the bytes.
    pub fn wrong_checksums(mut self) -> Seed {
        self.wrong_checksums = true;
        self
    }
    pub fn id(mut self, id: &str) -> Seed {
        self.id = Some(id.to_string());
        self
    }
    /// Private to [`MEMBER_PROJECT`] (or another project).
    pub fn private_to(mut self, project: &str) -> Seed {
        self.owner = project.to_string();
        self.visibility = "private".to_string();
        self
    }
    pub fn status(mut self, status: &str) -> Seed {
        self.status = status.to_string();
        self
    }
    pub fn disk_format(mut self, f: &str) -> Seed {
        self.disk_format = f.to_string();
        self
    }
}

/// Adds `seed` directly (no HTTP), hashing its bytes as an upload would; returns its id.
pub fn seed(fake: &FakeGlance, seed: Seed) -> String {
    fake.seed(seed)
}

/// [`seed`] of a public active raw image named `name` with `data`.
pub fn seed_bytes(fake: &FakeGlance, name: &str, data: &[u8]) -> String {
    fake.seed(Seed::new(name, data))
}

impl FakeGlance {
    /// Starts the fake on 127.0.0.1:0, reading the image schema from the installed
    /// python-glanceclient.
    pub fn start() -> Result<FakeGlance, Unavailable> {
        let schemas = load_schemas()?;
        let dir = tempfile::Builder::new()
            .prefix("fake-glance")
            .tempdir()
            .map_err(|e| Unavailable(format!("temp dir: {e}")))?;
        let state = Arc::new(GlanceState {
            images: Mutex::new(BTreeMap::new()),
            dir,
            schemas,
            data_requests: Mutex::new(HashMap::new()),
            body_end: Arc::default(),
            requests: Mutex::new(Vec::new()),
            upload_bytes: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        });
        let st = state.clone();
        let server = Background::start("fake-glance", move |base| app(st, base));
        Ok(FakeGlance {
            url: server.url(),
            state,
            _server: server,
        })
    }

    /// See [`seed`].
    pub fn seed(&self, s: Seed) -> String {
        let id = s.id.clone().unwrap_or_else(new_uuid);
        let now = isotime(SystemTime::now());
        let mut rec = Map::new();
        rec.insert("id".into(), json!(id));
        rec.insert("name".into(), json!(s.name));
        rec.insert("owner".into(), json!(s.owner));
        rec.insert("visibility".into(), json!(s.visibility));
        rec.insert("disk_format".into(), json!(s.disk_format));
        rec.insert("container_format".into(), json!(s.container_format));
        rec.insert("os_hidden".into(), json!(s.os_hidden));
        rec.insert("protected".into(), json!(s.protected));
        rec.insert("min_disk".into(), json!(0));
        rec.insert("min_ram".into(), json!(0));
        rec.insert("tags".into(), json!([]));
        rec.insert("created_at".into(), json!(now));
        rec.insert("updated_at".into(), json!(now));
        for k in [
            "checksum",
            "os_hash_algo",
            "os_hash_value",
            "size",
            "virtual_size",
        ] {
            rec.insert(k.into(), Value::Null);
        }
        for (k, v) in s.properties {
            rec.insert(k, v);
        }
        let mut img = Image {
            rec,
            data: None,
            pace: s.pace,
        };
        match s.data {
            Some(bytes) => {
                let path = self.state.data_path(&id);
                let mut f = std::fs::File::create(&path).expect("seed file");
                f.write_all(&bytes).expect("seed write");
                set_data(
                    &mut img,
                    path,
                    &Md5::digest(&bytes),
                    &Sha512::digest(&bytes),
                    bytes.len() as u64,
                );
                img.rec.insert("status".into(), json!(s.status));
                if s.wrong_checksums {
                    img.rec.insert("checksum".into(), json!("0".repeat(32)));
                    img.rec
                        .insert("os_hash_value".into(), json!("0".repeat(128)));
                }
            }
            None => {
                img.rec.insert("status".into(), json!("queued"));
            }
        }
        self.state.images.lock().unwrap().insert(id.clone(), img);
        id
    }

    /// The record as an admin sees it (without `self`/`file`/`schema`).
    pub fn record(&self, id: &str) -> Option<Value> {
        let images = self.state.images.lock().unwrap();
        images.get(id).map(|i| Value::Object(i.rec.clone()))
    }

    /// The stored bytes' path (after an upload), to compare with what a client sent.
    pub fn data_path(&self, id: &str) -> Option<PathBuf> {
        self.state.images.lock().unwrap().get(id)?.data.clone()
    }

    /// Sets a field of a record directly (e.g. `status` to `deactivated`).
    pub fn set_field(&self, id: &str, key: &str, value: Value) {
        let mut images = self.state.images.lock().unwrap();
        let img = images.get_mut(id).expect("no such image");
        img.rec.insert(key.to_string(), value);
    }

    /// `GET /v2/images/{id}/file` requests answered with data (200 or 206) for `id`.
    pub fn data_requests(&self, id: &str) -> usize {
        let m = self.state.data_requests.lock().unwrap();
        m.get(id).copied().unwrap_or(0)
    }

    /// When a download of `id` last sent its last byte (or was cut).
    pub fn body_end(&self, id: &str) -> Option<Instant> {
        self.state.body_end.lock().unwrap().get(id).copied()
    }

    /// While `failing`, every `GET /v2/images/{id}/file` answers 503 (the store is down).
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Bytes received by `PUT /v2/images/{id}/file`, all uploads together.
    pub fn upload_bytes(&self) -> u64 {
        self.state.upload_bytes.load(Ordering::SeqCst)
    }

    /// Requests with this method and path class (e.g. `GET`, `/v2/images/{id}`).
    pub fn requests(&self, method: &str, class: &str) -> usize {
        let log = self.state.requests.lock().unwrap();
        log.iter()
            .filter(|r| r.method == method && r.class == class)
            .count()
    }

    /// Every request so far, in order.
    pub fn log(&self) -> Vec<Logged> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl GlanceState {
    fn data_path(&self, id: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        self.dir.path().join(format!("{id}.{n}"))
    }
}

fn set_data(img: &mut Image, path: PathBuf, md5: &[u8], sha512: &[u8], size: u64) {
    let r = &mut img.rec;
    r.insert("checksum".into(), json!(hex::encode(md5)));
    r.insert("os_hash_algo".into(), json!("sha512"));
    r.insert("os_hash_value".into(), json!(hex::encode(sha512)));
    r.insert("size".into(), json!(size));
    // Glance's format inspector fills virtual_size on upload; for raw it is the size.
    let raw = r.get("disk_format") == Some(&json!("raw"));
    r.insert(
        "virtual_size".into(),
        if raw { json!(size) } else { Value::Null },
    );
    if let Some(old) = img.data.replace(path) {
        let _ = std::fs::remove_file(old);
    }
}

// ---- Schemas -------------------------------------------------------------------------------

const SCHEMA_PY: &str = r#"
import copy, json
from glanceclient.v2 import image_schema
image = copy.deepcopy(image_schema._BASE_SCHEMA)
# glanceclient's copy caps both at 32; Glance's get_base_properties() serves 64 and 128 (a
# sha512 os_hash_value is 128 hex digits, and `glance image-update` validates against this).
image['properties']['os_hash_algo']['maxLength'] = 64
image['properties']['os_hash_value']['maxLength'] = 128
item = copy.deepcopy(image)
definitions = item.pop('definitions', None)
images = {
    'name': 'images',
    'properties': {
        'images': {'type': 'array', 'items': item},
        'first': {'type': 'string'},
        'next': {'type': 'string'},
        'schema': {'type': 'string'},
    },
    'links': [
        {'rel': 'first', 'href': '{first}'},
        {'rel': 'next', 'href': '{next}'},
        {'rel': 'describedby', 'href': '{schema}'},
    ],
}
if definitions:
    images['definitions'] = definitions
print(json.dumps({'image': image, 'images': images}))
"#;

fn load_schemas() -> Result<Schemas, Unavailable> {
    let out = std::process::Command::new("python3")
        .args(["-c", SCHEMA_PY])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Unavailable(format!("python3 not runnable: {e}")))?;
    if !out.status.success() {
        return Err(Unavailable(format!(
            "python-glanceclient's image schema not readable (pip install \
             python-glanceclient): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Unavailable(format!("schema output is not JSON: {e}")))?;
    Ok(Schemas {
        image: v["image"].take(),
        images: v["images"].take(),
    })
}

// ---- Auth, request ids, counting -----------------------------------------------------------

#[derive(Clone, Debug)]
struct Ctx {
    admin: bool,
    project: &'static str,
}

fn ctx_of(headers: &HeaderMap) -> Option<Ctx> {
    match headers.get("x-auth-token").and_then(|v| v.to_str().ok()) {
        Some(ADMIN_TOKEN) => Some(Ctx {
            admin: true,
            project: ADMIN_PROJECT,
        }),
        Some(MEMBER_TOKEN) => Some(Ctx {
            admin: false,
            project: MEMBER_PROJECT,
        }),
        Some(OTHER_TOKEN) => Some(Ctx {
            admin: false,
            project: OTHER_PROJECT,
        }),
        _ => None,
    }
}

fn class_of(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if uuid::Uuid::try_parse(seg).is_ok() {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

async fn keystone(State(st): State<Arc<GlanceState>>, mut req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let path = req.uri().path().to_string();
    let token = req
        .headers()
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let open = path == "/" || path == "/versions";
    let mut resp = if open {
        next.run(req).await
    } else {
        match ctx_of(req.headers()) {
            Some(ctx) => {
                req.extensions_mut().insert(ctx);
                next.run(req).await
            }
            None => unauthorized(),
        }
    };
    let rid = format!("req-{}", new_uuid());
    resp.headers_mut().insert(
        "x-openstack-request-id",
        HeaderValue::from_str(&rid).expect("ascii"),
    );
    st.requests.lock().unwrap().push(Logged {
        method,
        uri,
        class: class_of(&path),
        token,
        status: resp.status().as_u16(),
    });
    resp
}

/// keystonemiddleware's rejection, as `auth_token.AuthProtocol.process_request` raises it.
fn unauthorized() -> Response {
    let body = json!({"error": {
        "code": 401,
        "title": "Unauthorized",
        "message": "The request you have made requires authentication.",
    }});
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::CONTENT_TYPE, "application/json; charset=UTF-8"),
            (
                header::WWW_AUTHENTICATE,
                &format!("Keystone uri=\"{KEYSTONE_URI}\""),
            ),
        ],
        body.to_string(),
    )
        .into_response()
}

/// A webob `HTTPException` response: JSON, HTML or plain text by the client's `Accept`, as
/// webob 1.8 chooses (`acceptable_offers(['text/html', 'application/json'])`).
fn webob_error(headers: &HeaderMap, status: StatusCode, explanation: &str) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let title = status.canonical_reason().unwrap_or("");
    let line = format!("{} {title}", status.as_u16());
    let body = format!("{explanation}<br /><br />\n\n\n");
    let html_ok = accept.is_empty()
        || accept.contains("text/html")
        || accept.contains("*/*")
        || accept.contains("text/*");
    let json_ok = accept.contains("application/json");
    let (ctype, text) = if json_ok && !accept.contains("text/html") {
        (
            "application/json",
            json!({"message": body, "code": line, "title": title}).to_string(),
        )
    } else if html_ok {
        (
            "text/html; charset=UTF-8",
            format!(
                "<html>\n <head>\n  <title>{line}</title>\n </head>\n <body>\n  <h1>{line}</h1>\n  \
                 {body}\n </body>\n</html>"
            ),
        )
    } else {
        (
            "text/plain; charset=UTF-8",
            format!("{line}\n\n{explanation}\n\n   "),
        )
    };
    (status, [(header::CONTENT_TYPE, ctype)], text).into_response()
}

// ---- Routes --------------------------------------------------------------------------------

#[derive(Clone)]
struct App {
    st: Arc<GlanceState>,
    base: Arc<String>,
}

fn app(st: Arc<GlanceState>, base: String) -> Router {
    let a = App {
        st: st.clone(),
        base: Arc::new(base),
    };
    Router::new()
        .route("/", get(root))
        .route("/versions", get(versions))
        .route("/v2/schemas/image", get(schema_image))
        .route("/v2/schemas/images", get(schema_images))
        .route("/v2/info/stores/detail", get(stores_detail))
        .route("/v2/images", get(list).post(create))
        .route(
            "/v2/images/{id}",
            get(show).patch(update).delete(delete_image),
        )
        .route("/v2/images/{id}/file", put(upload).get(download))
        .route("/v2/images/{id}/actions/deactivate", post(deactivate))
        .route("/v2/images/{id}/actions/reactivate", post(reactivate))
        .fallback(not_found_path)
        .with_state(a)
        .layer(middleware::from_fn_with_state(st, keystone))
}

async fn not_found_path(headers: HeaderMap) -> Response {
    webob_error(
        &headers,
        StatusCode::NOT_FOUND,
        "The resource could not be found.",
    )
}

fn versions_body(base: &str) -> Value {
    let href = format!("{}/v2/", base.trim_end_matches('/'));
    let v = |id: &str, status: &str| {
        json!({"id": format!("v{id}"), "status": status,
               "links": [{"rel": "self", "href": href}]})
    };
    let mut out = vec![
        v("2.15", "SUPPORTED"),
        v("2.9", "SUPPORTED"),
        v("2.17", "CURRENT"),
    ];
    for id in ["2.7", "2.6", "2.5", "2.4", "2.3", "2.2", "2.1", "2.0"] {
        out.push(v(id, "SUPPORTED"));
    }
    json!({ "versions": out })
}

async fn root(State(a): State<App>) -> Response {
    (
        StatusCode::MULTIPLE_CHOICES,
        [(header::CONTENT_TYPE, "application/json")],
        versions_body(&a.base).to_string(),
    )
        .into_response()
}

async fn versions(State(a): State<App>) -> Response {
    json_resp(StatusCode::OK, &versions_body(&a.base))
}

fn json_resp(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn schema_image(State(a): State<App>) -> Response {
    json_resp(StatusCode::OK, &a.st.schemas.image)
}

async fn schema_images(State(a): State<App>) -> Response {
    json_resp(StatusCode::OK, &a.st.schemas.images)
}

async fn stores_detail(ctx: axum::Extension<Ctx>, headers: HeaderMap) -> Response {
    if !ctx.admin {
        return webob_error(
            &headers,
            StatusCode::FORBIDDEN,
            "You are not authorized to complete stores_info_detail action.",
        );
    }
    json_resp(
        StatusCode::OK,
        &json!({"stores": [{"id": "file1", "type": "file", "default": true, "weight": 0,
                            "properties": {"data_dir": "/var/lib/glance/images/",
                                           "chunk_size": 65536, "thin_provisioning": false}}]}),
    )
}

fn visible(ctx: &Ctx, rec: &Map<String, Value>) -> bool {
    if ctx.admin {
        return true;
    }
    let vis = rec.get("visibility").and_then(Value::as_str).unwrap_or("");
    vis == "public" || vis == "community" || rec.get("owner") == Some(&json!(ctx.project))
}

fn owns(ctx: &Ctx, rec: &Map<String, Value>) -> bool {
    ctx.admin || rec.get("owner") == Some(&json!(ctx.project))
}

/// A record as Glance's `ResponseSerializer._format_image` shows it.
fn view(rec: &Map<String, Value>) -> Value {
    let mut v = rec.clone();
    let id = rec["id"].as_str().unwrap_or_default().to_string();
    v.insert("self".into(), json!(format!("/v2/images/{id}")));
    v.insert("file".into(), json!(format!("/v2/images/{id}/file")));
    v.insert("schema".into(), json!("/v2/schemas/image"));
    Value::Object(v)
}

fn no_image(headers: &HeaderMap, id: &str) -> Response {
    webob_error(
        headers,
        StatusCode::NOT_FOUND,
        &format!("No image found with ID {id}"),
    )
}

/// The image if `ctx` may see it, else Glance's 404.
fn find(a: &App, ctx: &Ctx, headers: &HeaderMap, id: &str) -> Result<Image, Box<Response>> {
    let images = a.st.images.lock().unwrap();
    match images.get(id) {
        Some(img) if visible(ctx, &img.rec) => Ok(img.clone()),
        _ => Err(Box::new(no_image(headers, id))),
    }
}

async fn show(
    State(a): State<App>,
    ctx: axum::Extension<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match find(&a, &ctx, &headers, &id) {
        Ok(img) => json_resp(StatusCode::OK, &view(&img.rec)),
        Err(r) => *r,
    }
}

/// Query pairs in order, repeated keys kept (`tag=a&tag=b`).
fn pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn pct_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_pairs(p: &[(String, String)]) -> String {
    p.iter()
        .map(|(k, v)| format!("{}={}", pct_encode(k), pct_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn cmp_field(a: &Map<String, Value>, b: &Map<String, Value>, key: &str) -> std::cmp::Ordering {
    let (x, y) = (
        a.get(key).unwrap_or(&Value::Null),
        b.get(key).unwrap_or(&Value::Null),
    );
    match (x, y) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(std::cmp::Ordering::Equal),
        (Value::Null, Value::Null) => std::cmp::Ordering::Equal,
        (Value::Null, _) => std::cmp::Ordering::Less,
        (_, Value::Null) => std::cmp::Ordering::Greater,
        _ => x.to_string().cmp(&y.to_string()),
    }
}

/// `GET /v2/images`: Glance's filters (any other key is a property filter), `limit` (default
/// 25, max 1000), `marker` (400 when unknown), `sort_key`/`sort_dir` or `sort=k:d,...`
/// (default `created_at desc, id desc`), and the `first`/`next`/`schema` links.
async fn list(State(a): State<App>, ctx: axum::Extension<Ctx>, req: Request) -> Response {
    let headers = req.headers().clone();
    let params = pairs(req.uri().query().unwrap_or(""));
    let mut limit = 25usize;
    let mut marker = None;
    let mut sort: Vec<(String, bool)> = Vec::new();
    let mut sort_dirs: Vec<bool> = Vec::new();
    let mut filters: Vec<(String, String)> = Vec::new();
    let mut tags = Vec::new();
    let mut hidden = false;
    for (k, v) in &params {
        match k.as_str() {
            "limit" => match v.parse::<i64>() {
                Ok(n) if n >= 0 => limit = (n as usize).min(1000),
                _ => {
                    return webob_error(
                        &headers,
                        StatusCode::BAD_REQUEST,
                        "limit param must be positive",
                    );
                }
            },
            "marker" => marker = Some(v.clone()),
            "sort_key" => sort.push((v.clone(), true)),
            "sort_dir" => sort_dirs.push(v == "desc"),
            "sort" => {
                for part in v.split(',') {
                    let (key, dir) = part.split_once(':').unwrap_or((part, "desc"));
                    sort.push((key.trim().to_string(), dir.trim() != "asc"));
                }
            }
            "member_status" => {}
            "tag" => tags.push(v.clone()),
            "os_hidden" => hidden = v == "true",
            _ => filters.push((k.clone(), v.clone())),
        }
    }
    for (i, d) in sort_dirs.into_iter().enumerate() {
        if let Some(s) = sort.get_mut(i) {
            s.1 = d;
        }
    }
    if sort.is_empty() {
        sort.push(("created_at".into(), true));
    }
    if !sort.iter().any(|(k, _)| k == "id") {
        sort.push(("id".into(), true));
    }
    let mut recs: Vec<Map<String, Value>> = {
        let images = a.st.images.lock().unwrap();
        images
            .values()
            .filter(|i| visible(&ctx, &i.rec))
            .filter(|i| i.rec.get("os_hidden") == Some(&json!(hidden)))
            .filter(|i| {
                filters.iter().all(|(k, v)| match i.rec.get(k) {
                    Some(Value::String(s)) => s == v,
                    Some(Value::Null) | None => false,
                    Some(other) => serde_json::to_string(other).is_ok_and(|s| s == *v),
                })
            })
            .filter(|i| {
                tags.iter().all(|t| {
                    i.rec["tags"]
                        .as_array()
                        .is_some_and(|a| a.contains(&json!(t)))
                })
            })
            .map(|i| i.rec.clone())
            .collect()
    };
    recs.sort_by(|x, y| {
        for (k, desc) in &sort {
            let o = cmp_field(x, y, k);
            let o = if *desc { o.reverse() } else { o };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
    let start = match &marker {
        None => 0,
        Some(m) => match recs.iter().position(|r| r["id"] == json!(m)) {
            Some(p) => p + 1,
            None => {
                return webob_error(
                    &headers,
                    StatusCode::BAD_REQUEST,
                    &format!("Invalid marker. Image {m} could not be found."),
                );
            }
        },
    };
    let page: Vec<Value> = recs.iter().skip(start).take(limit).map(view).collect();
    let rest: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "marker")
        .cloned()
        .collect();
    let mut body = Map::new();
    body.insert(
        "first".into(),
        json!(if rest.is_empty() {
            "/v2/images".to_string()
        } else {
            format!("/v2/images?{}", encode_pairs(&rest))
        }),
    );
    body.insert("schema".into(), json!("/v2/schemas/images"));
    // Glance gives `next` whenever a page is full (the repo returns a next marker when it
    // found `limit` images), even if nothing follows.
    if limit > 0 && page.len() == limit {
        let last = page.last().expect("full page")["id"].clone();
        let mut next = rest.clone();
        next.push((
            "marker".into(),
            last.as_str().unwrap_or_default().to_string(),
        ));
        body.insert(
            "next".into(),
            json!(format!("/v2/images?{}", encode_pairs(&next))),
        );
    }
    body.insert("images".into(), Value::Array(page));
    json_resp(StatusCode::OK, &Value::Object(body))
}

const READ_ONLY: &[&str] = &[
    "checksum",
    "created_at",
    "updated_at",
    "size",
    "virtual_size",
    "status",
    "os_hash_algo",
    "os_hash_value",
    "self",
    "file",
    "schema",
    "direct_url",
    "locations",
];
const DISK_FORMATS: &[&str] = &[
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
];
const CONTAINER_FORMATS: &[&str] = &[
    "ami",
    "ari",
    "aki",
    "bare",
    "ovf",
    "ova",
    "docker",
    "compressed",
];

/// Validates one attribute as Glance's schema and domain do; `Err` is (status, message).
fn check_attr(ctx: &Ctx, key: &str, v: &Value) -> Result<(), (StatusCode, String)> {
    let bad = |m: String| Err((StatusCode::BAD_REQUEST, m));
    if READ_ONLY.contains(&key) {
        return Err((
            StatusCode::FORBIDDEN,
            format!("Attribute '{key}' is read-only."),
        ));
    }
    match key {
        "disk_format" if !(v.is_null() || DISK_FORMATS.iter().any(|f| v == *f)) => {
            bad(format!("Invalid disk format '{v}' for image."))
        }
        "container_format" if !(v.is_null() || CONTAINER_FORMATS.iter().any(|f| v == *f)) => {
            bad(format!("Invalid container format '{v}' for image."))
        }
        "visibility" => match v.as_str() {
            Some("public") if !ctx.admin => Err((
                StatusCode::FORBIDDEN,
                "You are not authorized to complete publicize_image action.".into(),
            )),
            Some("public" | "private" | "shared" | "community") => Ok(()),
            _ => bad(format!("Invalid visibility value: {v}")),
        },
        "min_disk" | "min_ram" if !v.is_u64() => bad(format!("Invalid value for {key}: {v}")),
        "protected" | "os_hidden" if !v.is_boolean() => {
            bad(format!("Invalid value for {key}: {v}"))
        }
        "tags" if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) => {
            bad("Invalid tags".into())
        }
        "name" if !(v.is_null() || v.is_string()) => bad(format!("Invalid name: {v}")),
        "id" | "owner" | "name" | "disk_format" | "container_format" | "min_disk" | "min_ram"
        | "protected" | "os_hidden" | "tags" => Ok(()),
        // Additional properties are strings (the schema's additionalProperties).
        _ if !v.is_string() => bad(format!("Invalid value for {key}: {v} is not a string")),
        _ => Ok(()),
    }
}

/// `POST /v2/images`: 201, status queued, `Location` absolute (webob makes it so).
async fn create(
    State(a): State<App>,
    ctx: axum::Extension<Ctx>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
        return webob_error(
            &headers,
            StatusCode::BAD_REQUEST,
            "Malformed JSON in request body.",
        );
    };
    for (k, v) in &fields {
        if let Err((s, m)) = check_attr(&ctx, k, v) {
            return webob_error(&headers, s, &m);
        }
    }
    let id = match fields.get("id") {
        Some(Value::String(s)) if uuid::Uuid::try_parse(s).is_ok() => s.clone(),
        Some(v) => {
            return webob_error(
                &headers,
                StatusCode::BAD_REQUEST,
                &format!("Invalid id: {v}"),
            );
        }
        None => new_uuid(),
    };
    if a.st.images.lock().unwrap().contains_key(&id) {
        return webob_error(
            &headers,
            StatusCode::CONFLICT,
            &format!("Image with identifier {id} already exists!"),
        );
    }
    let mut rec_fields = fields.clone();
    rec_fields.remove("id");
    {
        // Build the record as seed() does, then apply the client's fields.
        let now = isotime(SystemTime::now());
        let mut rec = Map::new();
        rec.insert("id".into(), json!(id));
        rec.insert("name".into(), Value::Null);
        rec.insert("owner".into(), json!(ctx.project));
        rec.insert("visibility".into(), json!("shared"));
        rec.insert("disk_format".into(), Value::Null);
        rec.insert("container_format".into(), Value::Null);
        rec.insert("os_hidden".into(), json!(false));
        rec.insert("protected".into(), json!(false));
        rec.insert("min_disk".into(), json!(0));
        rec.insert("min_ram".into(), json!(0));
        rec.insert("tags".into(), json!([]));
        rec.insert("status".into(), json!("queued"));
        rec.insert("created_at".into(), json!(now));
        rec.insert("updated_at".into(), json!(now));
        for k in [
            "checksum",
            "os_hash_algo",
            "os_hash_value",
            "size",
            "virtual_size",
        ] {
            rec.insert(k.into(), Value::Null);
        }
        for (k, v) in rec_fields {
            rec.insert(k, v);
        }
        a.st.images.lock().unwrap().insert(
            id.clone(),
            Image {
                rec,
                data: None,
                pace: Pace::default(),
            },
        );
    }
    let rec = a.st.images.lock().unwrap()[&id].rec.clone();
    let mut r = json_resp(StatusCode::CREATED, &view(&rec));
    let loc = format!("{}/v2/images/{id}", a.base);
    r.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&loc).expect("ascii"),
    );
    r.headers_mut().insert(
        "openstack-image-import-methods",
        HeaderValue::from_static("glance-direct,web-download,copy-image"),
    );
    r
}

/// `PATCH /v2/images/{id}`: the json-patch media types Glance accepts (415 otherwise, with
/// `Accept-Patch`), `add`/`replace`/`remove` on top-level attributes.
async fn update(
    State(a): State<App>,
    ctx: axum::Extension<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Response {
    const TYPES: &str = "application/openstack-images-v2.0-json-patch, application/openstack-images-v2.1-json-patch";
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if ctype != "application/openstack-images-v2.0-json-patch"
        && ctype != "application/openstack-images-v2.1-json-patch"
    {
        let mut r = webob_error(
            &headers,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("Image PATCH expects Content-Type one of: {TYPES}"),
        );
        r.headers_mut()
            .insert("accept-patch", HeaderValue::from_static(TYPES));
        return r;
    }
    if let Err(r) = find(&a, &ctx, &headers, &id) {
        return *r;
    }
    let Ok(Value::Array(ops)) = serde_json::from_slice::<Value>(&body) else {
        return webob_error(
            &headers,
            StatusCode::BAD_REQUEST,
            "Request body must be a JSON array of operation objects.",
        );
    };
    let mut images = a.st.images.lock().unwrap();
    let img = images.get_mut(&id).expect("found above");
    if !owns(&ctx, &img.rec) {
        return webob_error(
            &headers,
            StatusCode::FORBIDDEN,
            "You are not permitted to modify this image.",
        );
    }
    let mut rec = img.rec.clone();
    for op in &ops {
        let (Some(verb), Some(path)) = (op["op"].as_str(), op["path"].as_str()) else {
            return webob_error(
                &headers,
                StatusCode::BAD_REQUEST,
                "Unable to find `op` or `path` in JSON Schema change.",
            );
        };
        let key = path
            .trim_start_matches('/')
            .replace("~1", "/")
            .replace("~0", "~");
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        let check = if verb == "remove" {
            check_attr(&ctx, &key, &json!("x"))
        } else {
            check_attr(&ctx, &key, &value)
        };
        if let Err((s, m)) = check {
            return webob_error(&headers, s, &m);
        }
        match verb {
            "add" | "replace" => {
                if verb == "replace" && !rec.contains_key(&key) {
                    return webob_error(
                        &headers,
                        StatusCode::CONFLICT,
                        &format!("Property {key} does not exist."),
                    );
                }
                rec.insert(key, value);
            }
            "remove" => {
                if rec.remove(&key).is_none() {
                    return webob_error(
                        &headers,
                        StatusCode::CONFLICT,
                        &format!("Property {key} does not exist."),
                    );
                }
            }
            _ => {
                return webob_error(
                    &headers,
                    StatusCode::BAD_REQUEST,
                    &format!("Invalid operation: `{verb}`"),
                );
            }
        }
    }
    rec.insert("updated_at".into(), json!(isotime(SystemTime::now())));
    img.rec = rec;
    json_resp(StatusCode::OK, &view(&img.rec))
}

/// `PUT /v2/images/{id}/file`: octet-stream only (415), owner or admin (403), queued only
/// (409), formats set first (400). Streamed to a temp file chunk by chunk, hashed on the way.
async fn upload(
    State(a): State<App>,
    ctx: axum::Extension<Ctx>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let headers = req.headers().clone();
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype.starts_with("application/octet-stream") {
        return webob_error(
            &headers,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("Content type {ctype} is not supported"),
        );
    }
    {
        let mut images = a.st.images.lock().unwrap();
        let Some(img) = images.get_mut(&id).filter(|i| visible(&ctx, &i.rec)) else {
            return no_image(&headers, &id);
        };
        if !owns(&ctx, &img.rec) {
            return webob_error(
                &headers,
                StatusCode::FORBIDDEN,
                "You are not permitted to upload data for this image.",
            );
        }
        let status = img.rec["status"].as_str().unwrap_or("").to_string();
        if status != "queued" {
            return webob_error(
                &headers,
                StatusCode::CONFLICT,
                &format!("Image status transition from {status} to saving is not allowed"),
            );
        }
        if img.rec["disk_format"].is_null() || img.rec["container_format"].is_null() {
            return webob_error(
                &headers,
                StatusCode::BAD_REQUEST,
                "Properties disk_format, container_format must be set prior to saving data.",
            );
        }
        img.rec.insert("status".into(), json!("saving"));
    }
    let path = a.st.data_path(&id);
    let result = async {
        let mut f = tokio::fs::File::create(&path).await?;
        let (mut md5, mut sha) = (Md5::new(), Sha512::new());
        let mut size = 0u64;
        let mut stream = req.into_body().into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            a.st.upload_bytes
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            md5.update(&chunk);
            sha.update(&chunk);
            size += chunk.len() as u64;
            f.write_all(&chunk).await?;
        }
        f.flush().await?;
        Ok::<_, std::io::Error>((md5.finalize(), sha.finalize(), size))
    }
    .await;
    let mut images = a.st.images.lock().unwrap();
    let Some(img) = images.get_mut(&id) else {
        let _ = std::fs::remove_file(&path);
        return webob_error(
            &headers,
            StatusCode::GONE,
            "Image was deleted during the upload.",
        );
    };
    match result {
        Ok((md5, sha, size)) => {
            set_data(img, path, &md5, &sha, size);
            img.rec.insert("status".into(), json!("active"));
            img.rec
                .insert("updated_at".into(), json!(isotime(SystemTime::now())));
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            img.rec.insert("status".into(), json!("queued"));
            webob_error(
                &headers,
                StatusCode::BAD_REQUEST,
                &format!("Error in upload: {e}"),
            )
        }
    }
}

/// `GET /v2/images/{id}/file`, as `image_data.ResponseSerializer.download`.
async fn download(
    State(a): State<App>,
    ctx: axum::Extension<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let img = match find(&a, &ctx, &headers, &id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    if img.rec["status"] == "deactivated" && !ctx.admin {
        return webob_error(
            &headers,
            StatusCode::FORBIDDEN,
            "The requested image has been deactivated. Image data download is forbidden.",
        );
    }
    let Some(path) = img.data.clone() else {
        return StatusCode::NO_CONTENT.into_response();
    };
    if a.st.failing.load(Ordering::SeqCst) {
        return webob_error(
            &headers,
            StatusCode::SERVICE_UNAVAILABLE,
            "The image data could not be read from its store.",
        );
    }
    let size = img.rec["size"].as_u64().unwrap_or(0);
    let (mut start, mut len, mut range_hdr) = (0u64, size, None);
    if let Some(r) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        match parse_range(r, size) {
            Some((s, e)) => {
                start = s;
                len = e - s + 1;
                range_hdr = Some(format!("bytes {s}-{e}/{size}"));
            }
            None => {
                let mut resp = webob_error(
                    &headers,
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "Requested range not satisfiable",
                );
                resp.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
                );
                return resp;
            }
        }
    }
    *a.st
        .data_requests
        .lock()
        .unwrap()
        .entry(id.clone())
        .or_default() += 1;
    let ends = a.st.body_end.clone();
    let body = paced_body(path, start, len, img.pace.clone(), move || {
        ends.lock().unwrap().insert(id.clone(), Instant::now());
    });
    let mut b = Response::builder()
        .status(if range_hdr.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len);
    if let Some(md5) = img.rec["checksum"].as_str() {
        b = b.header("content-md5", md5);
    }
    if let Some(cr) = range_hdr {
        b = b.header(header::CONTENT_RANGE, cr);
    }
    b.body(body).expect("response")
}

/// One `bytes=` range (start-end, start-, -suffix) within `size`, inclusive; `None` when
/// unsatisfiable or malformed.
pub(crate) fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || size == 0 {
            return None;
        }
        return Some((size.saturating_sub(n), size - 1));
    }
    let s: u64 = a.parse().ok()?;
    if s >= size {
        return None;
    }
    let e = if b.is_empty() {
        size - 1
    } else {
        b.parse::<u64>().ok()?.min(size - 1)
    };
    (e >= s).then_some((s, e))
}

/// `len` bytes of `path` from `start`, sent as `pace` says; `ended` is called when the last
/// byte was read or the body was cut.
pub(crate) fn paced_body(
    path: PathBuf,
    start: u64,
    len: u64,
    pace: Pace,
    ended: impl Fn() + Send + Sync + 'static,
) -> Body {
    let ended = Arc::new(ended);
    let stream = futures_util::stream::unfold(
        (None::<tokio::fs::File>, path, start, len),
        move |(f, path, pos, left)| {
            let (pace, ended) = (pace.clone(), ended.clone());
            async move {
                if left == 0 {
                    return None;
                }
                if let Some(d) = pace.die_after
                    && pos >= d
                {
                    // As a real origin dying mid-body: what it sent (the head, too, when
                    // nothing else was) reaches the client before the reset; hyper drops a
                    // response whose body fails before anything was flushed.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    ended();
                    return Some((
                        Err(std::io::Error::other("origin died")),
                        (None, path, pos, 0),
                    ));
                }
                if !pace.delay.is_zero() && f.is_some() {
                    tokio::time::sleep(pace.delay).await;
                }
                let mut f = match f {
                    Some(f) => f,
                    None => {
                        let mut f = match tokio::fs::File::open(&path).await {
                            Ok(f) => f,
                            Err(e) => return Some((Err(e), (None, path, pos, 0))),
                        };
                        if let Err(e) = f.seek(std::io::SeekFrom::Start(pos)).await {
                            return Some((Err(e), (None, path, pos, 0)));
                        }
                        f
                    }
                };
                let mut want = left.min(pace.chunk as u64);
                if let Some(d) = pace.die_after {
                    want = want.min(d.saturating_sub(pos).max(1));
                }
                let mut buf = vec![0u8; want as usize];
                match f.read(&mut buf).await {
                    Ok(0) => Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "file shorter than its size",
                        )),
                        (None, path, pos, 0),
                    )),
                    Ok(n) => {
                        buf.truncate(n);
                        let n = n as u64;
                        if n == left {
                            // hyper stops polling once Content-Length is reached: this is the end.
                            ended();
                        }
                        Some((
                            Ok(bytes::Bytes::from(buf)),
                            (Some(f), path, pos + n, left - n),
                        ))
                    }
                    Err(e) => Some((Err(e), (None, path, pos, 0))),
                }
            }
        },
    );
    Body::from_stream(stream)
}

async fn delete_image(
    State(a): State<App>,
    ctx: axum::Extension<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let mut images = a.st.images.lock().unwrap();
    let Some(img) = images.get(&id).filter(|i| visible(&ctx, &i.rec)) else {
        return no_image(&headers, &id);
    };
    if !owns(&ctx, &img.rec) {
        return webob_error(
            &headers,
            StatusCode::FORBIDDEN,
            "You are not authorized to complete delete_image action.",
        );
    }
    if img.rec["protected"] == true {
        return webob_error(
            &headers,
            StatusCode::FORBIDDEN,
            &format!("Image {id} is protected and cannot be deleted."),
        );
    }
    let img = images.remove(&id).expect("present");
    if let Some(p) = img.data {
        let _ = std::fs::remove_file(p);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn deactivate(
    State(a): State<App>,
    ctx: axum::Extension<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    transition(
        &a,
        &ctx,
        &headers,
        &id,
        "deactivate",
        "active",
        "deactivated",
    )
}

async fn reactivate(
    State(a): State<App>,
    ctx: axum::Extension<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    transition(
        &a,
        &ctx,
        &headers,
        &id,
        "reactivate",
        "deactivated",
        "active",
    )
}

/// Glance's `ImageActionsController`: the target state again is a no-op 204; any state but
/// `from` is 403.
fn transition(
    a: &App,
    ctx: &Ctx,
    headers: &HeaderMap,
    id: &str,
    action: &str,
    from: &str,
    to: &str,
) -> Response {
    let mut images = a.st.images.lock().unwrap();
    let Some(img) = images.get_mut(id).filter(|i| visible(ctx, &i.rec)) else {
        return no_image(headers, id);
    };
    if !owns(ctx, &img.rec) {
        return webob_error(
            headers,
            StatusCode::FORBIDDEN,
            &format!("You are not authorized to complete {action} action."),
        );
    }
    let status = img.rec["status"].as_str().unwrap_or("").to_string();
    if status == to {
        return StatusCode::NO_CONTENT.into_response();
    }
    if status != from {
        return webob_error(
            headers,
            StatusCode::FORBIDDEN,
            &format!("Not allowed to {action} image in status '{status}'"),
        );
    }
    img.rec.insert("status".into(), json!(to));
    img.rec
        .insert("updated_at".into(), json!(isotime(SystemTime::now())));
    StatusCode::NO_CONTENT.into_response()
}

// ---- Small helpers -------------------------------------------------------------------------

/// A random (v4-shaped) uuid without the `v4` feature: std's randomly keyed hasher.
pub(crate) fn new_uuid() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// `oslo_utils.timeutils.isotime`: `YYYY-MM-DDTHH:MM:SSZ`.
pub fn isotime(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isotime_is_utc_iso8601() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(isotime(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-4", 10), Some((0, 4)));
        assert_eq!(parse_range("bytes=5-", 10), Some((5, 9)));
        assert_eq!(parse_range("bytes=-3", 10), Some((7, 9)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=4-2", 10), None);
    }

    #[test]
    fn uuids_are_distinct_and_parse() {
        let (a, b) = (new_uuid(), new_uuid());
        assert_ne!(a, b);
        assert!(uuid::Uuid::try_parse(&a).is_ok());
        assert_eq!(
            class_of(&format!("/v2/images/{a}/file")),
            "/v2/images/{id}/file"
        );
    }
}
