//! Glance v2 origins: metadata from `GET /v2/images/{id}`, data from `GET /v2/images/{id}/file`.

use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use url::Url;
use uuid::Uuid;

use imgcache_store::{Algorithm, Integrity};

use super::http::HttpSource;
use super::{OriginMeta, Response, Validators};
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
        multihash.or_else(|| self.md5())
    }

    /// The legacy md5 `checksum`, which Glance sends as a download's `Content-MD5`.
    pub fn md5(&self) -> Option<Integrity> {
        self.checksum
            .as_deref()
            .and_then(|c| Integrity::new(Algorithm::Md5, c).ok())
    }

    /// `updated_at` as an HTTP date: the image's `Last-Modified` (Glance sends none with
    /// its data; an active image's data never changes, so this date is stable).
    pub fn last_modified(&self) -> Option<String> {
        let t = humantime::parse_rfc3339_weak(self.updated_at.as_deref()?).ok()?;
        Some(httpdate::fmt_http_date(t))
    }

    /// What a download of this image is, before its first byte.
    fn origin_meta(&self, size: Option<u64>) -> OriginMeta {
        OriginMeta {
            size: self.size.or(size),
            validators: Validators {
                last_modified: self.last_modified(),
                ..Validators::default()
            },
            checksum: self.integrity(),
            disk_format: self.disk_format.clone(),
            md5: self.md5(),
            resume: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn updated_at_is_an_http_date() {
        let mut img: super::GlanceImage = serde_json::from_value(serde_json::json!({
            "id": "x", "status": "active", "updated_at": "2026-12-01T09:30:05Z"
        }))
        .unwrap();
        assert_eq!(
            img.last_modified().as_deref(),
            Some("Tue, 01 Dec 2026 09:30:05 GMT")
        );
        img.updated_at = Some("not a date".into());
        assert_eq!(img.last_modified(), None);
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
        Ok(image.origin_meta(None))
    }

    /// The image's data from `offset` on (see [`HttpSource::get_rest`]).
    pub async fn rest(
        &self,
        id: &Uuid,
        offset: u64,
        if_range: Option<&str>,
    ) -> Result<std::result::Result<reqwest::Response, String>> {
        let url = self.url(&format!("/v2/images/{id}/file"))?;
        self.http
            .get_rest(&url, &self.headers(), None, offset, if_range, None)
            .await
    }

    /// Glance images are immutable per id, so there is nothing to revalidate: this always
    /// fetches, and the caller only calls it on a miss.
    pub async fn get(&self, id: &Uuid) -> Result<Response> {
        let image = self.active_image(id).await?;
        let url = self.url(&format!("/v2/images/{id}/file"))?;
        match self.http.get(&url, None, &self.headers()).await? {
            Response::Body { meta, body } => Ok(Response::Body {
                meta: OriginMeta {
                    resume: meta.resume,
                    ..image.origin_meta(meta.size)
                },
                body,
            }),
            other => Ok(other),
        }
    }
}
