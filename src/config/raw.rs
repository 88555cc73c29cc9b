//! On-disk shape of `kvcd.toml` and `modules.d/*.toml`: every field optional,
//! unknown keys rejected, spans kept so validation errors can point at a line.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A value with its byte range in the file.
pub(crate) type S<T> = Spanned<T>;

/// A spanned list of spanned strings.
pub(crate) type SList = S<Vec<S<String>>>;

/// `kvcd.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDaemon {
    pub(crate) state_dir: Option<S<String>>,
    pub(crate) runtime_dir: Option<S<String>>,
    pub(crate) kernel_modules_dir: Option<S<String>>,
    /// Accepted from older kvcd.toml files and ignored: kvcd runs no depmod.
    #[serde(rename = "depmod")]
    pub(crate) _depmod: Option<toml::Value>,
    pub(crate) podman: Option<S<String>>,
    pub(crate) firmware_dir: Option<S<String>>,
    pub(crate) keep_kernels: Option<S<i64>>,
    pub(crate) prepare_next_kernels: Option<bool>,
    pub(crate) max_parallel: Option<S<i64>>,
    pub(crate) retry_base_seconds: Option<S<i64>>,
    pub(crate) retry_max_seconds: Option<S<i64>>,
    pub(crate) unload_on_stop: Option<bool>,
    pub(crate) stop_timeout_seconds: Option<S<i64>>,
    pub(crate) pull_timeout_seconds: Option<S<i64>>,
    pub(crate) podman_timeout_seconds: Option<S<i64>>,
    pub(crate) signing: Option<S<RawSigning>>,
    pub(crate) metrics: Option<S<RawMetrics>>,
    /// Accepted from older kvcd.toml files and ignored: kvcd runs no depmod.
    #[serde(rename = "depmod_timeout_seconds")]
    pub(crate) _depmod_timeout_seconds: Option<toml::Value>,
}

/// `[signing]` in `kvcd.toml`: the key kvcd signs staged modules with.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSigning {
    pub(crate) key: Option<S<String>>,
    pub(crate) cert: Option<S<String>>,
    pub(crate) hash: Option<S<String>>,
}

/// `[metrics]` in `kvcd.toml`: where kvcd writes its Prometheus metrics.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub(crate) textfile: Option<S<String>>,
}

/// `modules.d/NAME.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModuleConfig {
    pub(crate) description: Option<S<String>>,
    pub(crate) version: Option<S<String>>,
    pub(crate) modules: Option<SList>,
    pub(crate) after: Option<SList>,
    pub(crate) replace_in_tree: Option<SList>,
    pub(crate) kernel_match: Option<S<String>>,
    pub(crate) force_unload: Option<bool>,
    pub(crate) sign: Option<bool>,
    pub(crate) parameters: Option<BTreeMap<S<String>, SList>>,
    pub(crate) directory: Option<S<RawDirectory>>,
    pub(crate) image: Option<S<RawImage>>,
    pub(crate) build: Option<S<RawBuild>>,
    pub(crate) hooks: Option<S<RawHooks>>,
    pub(crate) ready: Option<S<RawReady>>,
    #[serde(rename = "match")]
    pub(crate) devices: Option<S<RawMatch>>,
}

/// `[match]`: the devices the driver is for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    pub(crate) pci: Option<SList>,
    pub(crate) modalias: Option<SList>,
}

/// `[directory]`: a precompiled driver package on the host.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDirectory {
    pub(crate) path: Option<S<String>>,
}

/// `[image]`: a driver container image.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawImage {
    #[serde(rename = "ref")]
    pub(crate) reference: Option<S<String>>,
    pub(crate) pull: Option<S<String>>,
    pub(crate) auth_file: Option<S<String>>,
    pub(crate) tls_verify: Option<bool>,
    pub(crate) modules_dir: Option<S<String>>,
    pub(crate) firmware_dir: Option<S<String>>,
}

/// `[build]`: how to build the image on the node when it cannot be pulled.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBuild {
    pub(crate) context: Option<S<String>>,
    pub(crate) file: Option<S<String>>,
    pub(crate) args: Option<BTreeMap<S<String>, S<String>>>,
    pub(crate) secrets: Option<BTreeMap<S<String>, S<String>>>,
}

/// One path or a list of paths.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `[hooks]`: vendor commands around kvcd's steps, or a KVC framework library.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHooks {
    pub(crate) pre_load: Option<SList>,
    pub(crate) post_load: Option<SList>,
    pub(crate) pre_unload: Option<SList>,
    pub(crate) post_unload: Option<SList>,
    pub(crate) build: Option<SList>,
    pub(crate) timeout_seconds: Option<S<i64>>,
    pub(crate) build_timeout_seconds: Option<S<i64>>,
    pub(crate) kvc_library: Option<S<OneOrMany>>,
}

/// `[ready]`: when the driver counts as up.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReady {
    pub(crate) path: Option<S<String>>,
    pub(crate) command: Option<SList>,
    pub(crate) timeout_seconds: Option<S<i64>>,
}
