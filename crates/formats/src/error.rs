//! Why an image was refused: one variant per reason, each naming it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::{DiskFormat, Format};

/// A refusal from the format inspector (or its policy). Every variant names the reason an
/// operator needs to act on; none of them is retried by the fetch layer.
#[derive(Debug, Clone, Error)]
pub enum FormatError {
    #[error("qcow2 image names a backing file{}: qemu would open another file", backing_name(*.offset, .name))]
    BackingFile { offset: u64, name: Option<String> },

    #[error("qcow2 image declares an external data file (incompatible feature bit 2)")]
    DataFile,

    #[error("qcow2 image uses unknown or unsupported features: {detail}")]
    UnknownFeatures { detail: String },

    #[error("QED images are refused: the format is not supported and cannot be checked safely")]
    QedRefused,

    #[error("vmdk create type {} is not allowed (only monolithicSparse and streamOptimized)", .found.as_deref().map_or("(missing)".to_string(), |t| format!("{t:?}")))]
    VmdkCreateType { found: Option<String> },

    #[error("vmdk descriptor line {line:?} is not a comment, ddb, key=value or extent line")]
    VmdkDescriptorLine { line: String },

    #[error("vmdk descriptor is not ASCII text")]
    VmdkDescriptorEncoding,

    #[error("vmdk extent {line:?} names a path: qemu would open another file")]
    VmdkExtentPath { line: String },

    #[error("vmdk descriptor defines no extent")]
    VmdkNoExtent,

    #[error("vmdk stream-optimized footer is invalid: {reason}")]
    VmdkFooter { reason: &'static str },

    #[error("partition table (MBR) is not sane: {reason}")]
    MbrSanity { reason: String },

    #[error("LUKS version {version} is not supported (only LUKS1)")]
    LuksVersion { version: u16 },

    #[error("content matches several formats at once ({}): refusing an ambiguous image", format_list(.formats))]
    MultipleFormats { formats: Vec<Format> },

    #[error("{format} header truncated: {needed} bytes needed, the image has {size}")]
    Truncated {
        format: Format,
        needed: u64,
        size: u64,
    },

    #[error("{format} {what} is {value}, beyond the limit of {limit}")]
    OutOfBounds {
        format: Format,
        what: &'static str,
        value: u64,
        limit: u64,
    },

    #[error("{format} header is malformed: {reason}")]
    Malformed { format: Format, reason: String },

    #[error("image declared as {declared} but its content is {}", .detected.map_or("not in that format".to_string(), |f| f.to_string()))]
    FormatMismatch {
        declared: DiskFormat,
        detected: Option<Format>,
    },

    #[error("{format} images are not permitted here (permitted: {})", format_list(.permitted))]
    NotPermitted {
        format: Format,
        permitted: Vec<Format>,
    },

    #[error("unknown image format name {0:?}")]
    UnknownFormatName(String),

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
}

impl FormatError {
    /// A short stable name for the reason, e.g. for metrics and `--json`.
    pub fn reason(&self) -> &'static str {
        match self {
            FormatError::BackingFile { .. } => "backing_file",
            FormatError::DataFile => "data_file",
            FormatError::UnknownFeatures { .. } => "unknown_features",
            FormatError::QedRefused => "qed_refused",
            FormatError::VmdkCreateType { .. } => "vmdk_create_type",
            FormatError::VmdkDescriptorLine { .. } => "vmdk_descriptor_line",
            FormatError::VmdkDescriptorEncoding => "vmdk_descriptor_encoding",
            FormatError::VmdkExtentPath { .. } => "vmdk_extent_path",
            FormatError::VmdkNoExtent => "vmdk_no_extent",
            FormatError::VmdkFooter { .. } => "vmdk_footer",
            FormatError::MbrSanity { .. } => "mbr_sanity",
            FormatError::LuksVersion { .. } => "luks_version",
            FormatError::MultipleFormats { .. } => "multiple_formats",
            FormatError::Truncated { .. } => "truncated",
            FormatError::OutOfBounds { .. } => "out_of_bounds",
            FormatError::Malformed { .. } => "malformed",
            FormatError::FormatMismatch { .. } => "format_mismatch",
            FormatError::NotPermitted { .. } => "not_permitted",
            FormatError::UnknownFormatName(_) => "unknown_format_name",
            FormatError::Io { .. } => "io",
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        FormatError::Io {
            op,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn malformed(format: Format, reason: impl Into<String>) -> Self {
        FormatError::Malformed {
            format,
            reason: reason.into(),
        }
    }
}

fn backing_name(offset: u64, name: &Option<String>) -> String {
    match name {
        Some(n) => format!(" {n:?} (header offset {offset})"),
        None => format!(" (header offset {offset})"),
    }
}

fn format_list(formats: &[Format]) -> String {
    formats
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}
