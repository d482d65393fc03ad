//! The official weights on the Hugging Face hub, cached in the usual HF cache folder.

use anyhow::{Context, Result};
use std::path::PathBuf;

pub const ARPG_REPO: &str = "hp-l33/ARPG";
pub const VQ_REPO: &str = "FoundationVision/LlamaGen";
pub const VQ_FILE: &str = "vq_ds16_c2i.pt";

/// Path of `file` from `repo`: the cached copy if there is one, else a download.
/// `flag` names the option that takes a local copy instead, for the error message.
pub fn fetch(repo: &str, file: &str, flag: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if let Some(p) = cache.model(repo.to_string()).get(file) {
        return Ok(p);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let hint = || {
        format!(
            "cannot get {file} from the Hugging Face repository {repo} (offline or unreachable); \
             download it elsewhere and pass it with {flag} PATH"
        )
    };
    if offline {
        anyhow::bail!(hint());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .with_context(hint)?;
    api.model(repo.to_string()).get(file).with_context(hint)
}
