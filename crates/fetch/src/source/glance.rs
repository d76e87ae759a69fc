//! Glance v2 origins: metadata from `GET /v2/images/{id}`, data from `GET /v2/images/{id}/file`.

use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use url::Url;
use uuid::Uuid;

use imgcache_store::{Algorithm, Integrity};

use super::http::HttpSource;
use super::{OriginMeta, Response};
use crate::error::{FetchError, Result};

/// The fields of a Glance image record imgcache uses.
#[derive(Clone, Debug, Deserialize)]
pub struct GlanceImage {
    pub id: String,
    pub status: String,
    pub size: Option<u64>,
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    pub disk_format: Option<String>,
    pub updated_at: Option<String>,
}

impl GlanceImage {
    /// The strongest checksum Glance gives: os_hash_value (multihash, usually sha512) when its
    /// algorithm is one we compute, else the legacy md5 `checksum`.
    pub fn integrity(&self) -> Option<Integrity> {
        let multihash = match (&self.os_hash_algo, &self.os_hash_value) {
            (Some(algo), Some(v)) => algo
                .parse::<Algorithm>()
                .ok()
                .and_then(|a| Integrity::new(a, v).ok()),
            _ => None,
        };
        multihash.or_else(|| {
            self.checksum
                .as_deref()
                .and_then(|c| Integrity::new(Algorithm::Md5, c).ok())
        })
    }
}

#[derive(Clone, Debug)]
pub struct GlanceSource {
    base: Url,
    token: Option<String>,
    http: HttpSource,
}

impl GlanceSource {
    pub fn new(base: Url, token: Option<String>, http: HttpSource) -> Self {
        GlanceSource { base, token, http }
    }

    fn url(&self, path: &str) -> Result<Url> {
        let base = self.base.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}{path}"))
            .map_err(|e| FetchError::Config(format!("glance url: {e}")))
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = self
            .token
            .as_deref()
            .and_then(|t| HeaderValue::from_str(t).ok())
        {
            h.insert("x-auth-token", t);
        }
        h
    }

    pub async fn image(&self, id: &Uuid) -> Result<GlanceImage> {
        let url = self.url(&format!("/v2/images/{id}"))?;
        let body = self.http.get_small(&url, &self.headers(), 1 << 20).await?;
        serde_json::from_slice(&body).map_err(|e| FetchError::Origin {
            url: url.to_string(),
            reason: format!("not a Glance image record: {e}"),
        })
    }

    /// The image's record, refused unless it is active (only active images have data).
    async fn active_image(&self, id: &Uuid) -> Result<GlanceImage> {
        let image = self.image(id).await?;
        if image.status != "active" {
            return Err(FetchError::GlanceNotActive {
                id: id.to_string(),
                status: image.status,
            });
        }
        Ok(image)
    }

    /// What a download of the image would send (size, checksum, format), from its record alone.
    pub async fn meta(&self, id: &Uuid) -> Result<OriginMeta> {
        let image = self.active_image(id).await?;
        Ok(OriginMeta {
            size: image.size,
            checksum: image.integrity(),
            disk_format: image.disk_format.clone(),
            ..OriginMeta::default()
        })
    }

    /// Glance images are immutable per id, so there is nothing to revalidate: this always
    /// fetches, and the caller only calls it on a miss.
    pub async fn get(&self, id: &Uuid) -> Result<Response> {
        let image = self.active_image(id).await?;
        let url = self.url(&format!("/v2/images/{id}/file"))?;
        match self.http.get(&url, None, &self.headers()).await? {
            Response::Body { meta, body } => Ok(Response::Body {
                meta: OriginMeta {
                    size: image.size.or(meta.size),
                    checksum: image.integrity(),
                    disk_format: image.disk_format.clone(),
                    ..meta
                },
                body,
            }),
            other => Ok(other),
        }
    }
}
