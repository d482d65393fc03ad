//! Request bodies, their validation, and the JSON error shape.
//!
//! Field names are `arpg sample` / `arpg inpaint` / `arpg outpaint` flags in snake case, with
//! the same defaults and ranges. Every problem is a 4xx answering
//! `{"error": {"field": "...", "message": "..."}}`.

use crate::engine::Work;
use arpg::editor::{token_mask, Canvas};
use arpg::sampler::{token_counts, SampleConfig, TokenFilter};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use image::RgbImage;
use serde::Deserialize;
use std::collections::VecDeque;

/// A 4xx/5xx answer with the field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub field: Option<String>,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status,
            field: field.map(str::to_string),
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, Some(field), message)
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"field": self.field, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert("retry-after", s.to_string().parse().expect("digits"));
        }
        r
    }
}

/// Parse a JSON body strictly: unknown fields, wrong types and bad JSON name their field.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            None,
            "expected a JSON object body",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // An unknown field is reported at its parent: name the field itself.
        let named = msg
            .strip_prefix("unknown field `")
            .or_else(|| msg.strip_prefix("missing field `"));
        let field = if let Some(rest) = named {
            rest.split('`').next().map(str::to_string)
        } else if path == "." || path.is_empty() {
            None
        } else {
            Some(path)
        };
        let status = if inner.is_syntax() || inner.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError {
            status,
            field,
            message: msg,
            retry_after: None,
        }
    })
}

/// A class by id or by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ClassRef {
    Id(u64),
    Name(String),
}

/// The model's classes: names for lookup and for `GET /v1/models`.
pub struct ClassNames {
    pub names: Vec<String>,
}

const IMAGENET: &str = include_str!("imagenet_classes.txt");

impl ClassNames {
    /// ImageNet names for 1000-class models, else the ids themselves ("0".."9" for digits).
    pub fn for_classes(n: usize) -> Self {
        let names = if n == 1000 {
            IMAGENET.lines().map(str::to_string).collect()
        } else {
            (0..n).map(|i| i.to_string()).collect()
        };
        Self { names }
    }

    /// A class id from an id or a name: the full name or any of its comma-separated
    /// synonyms, case-insensitively ("golden retriever", "Tinca tinca").
    pub fn resolve(&self, field: &str, c: &ClassRef) -> Result<usize, ApiError> {
        let n = self.names.len();
        match c {
            ClassRef::Id(i) if (*i as usize) < n => Ok(*i as usize),
            ClassRef::Id(i) => Err(ApiError::bad(
                field,
                format!(
                    "class id {i} is out of range for a model with {n} classes (0..={})",
                    n - 1
                ),
            )),
            ClassRef::Name(s) => {
                let want = s.trim().to_lowercase();
                if let Ok(i) = want.parse::<usize>() {
                    return self.resolve(field, &ClassRef::Id(i as u64));
                }
                self.names
                    .iter()
                    .position(|name| {
                        name.to_lowercase() == want
                            || name.split(',').any(|syn| syn.trim().to_lowercase() == want)
                    })
                    .ok_or_else(|| ApiError::bad(field, format!("no class is named {s:?}")))
            }
        }
    }
}

/// The decoding fields shared by every endpoint (the flags of `arpg sample`).
#[derive(Debug, Clone, Default)]
pub struct Decoding {
    pub steps: Option<usize>,
    pub cfg: Option<f32>,
    pub cfg_schedule: Option<String>,
    pub schedule: Option<String>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
}

impl Decoding {
    /// Validated settings for decoding `unknown` tokens.
    pub fn config(&self, unknown: usize, vocab: usize) -> Result<SampleConfig, ApiError> {
        let d = SampleConfig::default();
        let cfg = self.cfg.unwrap_or(d.cfg);
        if !(cfg.is_finite() && (0.0..=100.0).contains(&cfg)) {
            return Err(ApiError::bad(
                "cfg",
                format!("cfg {cfg} must be in [0, 100]"),
            ));
        }
        let cfg_schedule = match &self.cfg_schedule {
            Some(s) => s
                .parse()
                .map_err(|e: anyhow::Error| ApiError::bad("cfg_schedule", e.to_string()))?,
            None => d.cfg_schedule,
        };
        let schedule = match &self.schedule {
            Some(s) => s
                .parse()
                .map_err(|e: anyhow::Error| ApiError::bad("schedule", e.to_string()))?,
            None => d.schedule,
        };
        let steps = self.steps.unwrap_or(d.steps);
        if steps == 0 || steps > unknown {
            return Err(ApiError::bad(
                "steps",
                format!("steps {steps} must be in 1..={unknown} (the tokens to decode)"),
            ));
        }
        token_counts(unknown, steps, schedule)
            .map_err(|e| ApiError::bad("steps", e.to_string()))?;
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=100.0).contains(&temperature)) {
            return Err(ApiError::bad(
                "temperature",
                format!("temperature {temperature} must be in [0, 100]"),
            ));
        }
        let top_k = self.top_k.unwrap_or(0);
        if top_k > vocab {
            return Err(ApiError::bad(
                "top_k",
                format!("top_k {top_k} must be in 0..={vocab} (0 = off)"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(
                "top_p",
                format!("top_p {top_p} must be in (0, 1]"),
            ));
        }
        Ok(SampleConfig {
            steps,
            cfg,
            cfg_schedule,
            schedule,
            filter: TokenFilter {
                temperature,
                top_k,
                top_p,
            },
        })
    }
}

macro_rules! decoding_fields {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($body)*
            pub steps: Option<usize>,
            pub cfg: Option<f32>,
            pub cfg_schedule: Option<String>,
            pub schedule: Option<String>,
            pub temperature: Option<f32>,
            pub top_k: Option<usize>,
            pub top_p: Option<f32>,
            pub seed: Option<u64>,
            /// Answer as server-sent events (progress, then the images).
            pub stream: Option<bool>,
        }
        impl $name {
            pub fn decoding(&self) -> Decoding {
                Decoding {
                    steps: self.steps,
                    cfg: self.cfg,
                    cfg_schedule: self.cfg_schedule.clone(),
                    schedule: self.schedule.clone(),
                    temperature: self.temperature,
                    top_k: self.top_k,
                    top_p: self.top_p,
                    seed: self.seed,
                }
            }
        }
    };
}

decoding_fields! {
    /// `POST /v1/generate`.
    pub struct GenerateReq {
        pub classes: Option<Vec<ClassRef>>,
        pub per_class: Option<usize>,
        pub order_per_sample: Option<bool>,
        pub condition: Option<String>,
        pub canny: Option<bool>,
        pub control_guidance: Option<String>,
    }
}

decoding_fields! {
    /// `POST /v1/inpaint`: `image` and `mask` base64 PNG/JPEG (data URLs accepted), white
    /// mask pixels regenerated.
    pub struct InpaintReq {
        pub image: String,
        pub mask: String,
        pub class: ClassRef,
        pub samples: Option<usize>,
        pub condition: Option<String>,
        pub canny: Option<bool>,
        pub control_guidance: Option<String>,
    }
}

decoding_fields! {
    /// `POST /v1/outpaint`: `image` base64, pads in pixels.
    pub struct OutpaintReq {
        pub image: String,
        pub class: ClassRef,
        pub left: Option<usize>,
        pub right: Option<usize>,
        pub top: Option<usize>,
        pub bottom: Option<usize>,
        pub samples: Option<usize>,
    }
}

/// Limits the handlers enforce.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_images: usize,
    pub max_image_side: u32,
    /// Outpainted canvases: at most this many model grids per side.
    pub max_outpaint: usize,
}

/// What the model looks like, for validation.
pub struct ModelShape {
    pub grid: usize,
    pub patch: usize,
    pub vocab: usize,
    pub num_classes: usize,
    /// A control model's condition shape `[C, H, W]` and whether it learned the null
    /// condition (see `arpg::sampler::DecodeShape::control`).
    pub control: Option<((usize, usize, usize), bool)>,
}

/// A request's condition for a control model (`condition`: base64 image; `canny`: it is a
/// photo whose edges are used; `control_guidance`: `joint` or `class`), as `arpg sample
/// --condition` reads one: `[1, C, H, W]` and whether guidance acts on it.
pub fn condition(
    image: Option<&str>,
    canny: Option<bool>,
    guidance: Option<&str>,
    m: &ModelShape,
    lim: &Limits,
) -> Result<Option<(candle_core::Tensor, bool)>, ApiError> {
    let Some(b64) = image else {
        for (field, given) in [
            ("canny", canny.is_some()),
            ("control_guidance", guidance.is_some()),
        ] {
            if given {
                return Err(ApiError::bad(field, format!("{field} needs a condition")));
            }
        }
        return match m.control {
            Some((_, false)) => Err(ApiError::bad(
                "condition",
                "this control model was trained without condition dropout: it needs a condition",
            )),
            _ => Ok(None),
        };
    };
    let Some(((c, side, _), dropout)) = m.control else {
        return Err(ApiError::bad(
            "condition",
            "this model has no control encoder: it takes no condition",
        ));
    };
    let guide = match guidance {
        None => dropout,
        Some("joint") if dropout => true,
        Some("joint") => {
            return Err(ApiError::bad(
                "control_guidance",
                "joint guidance needs a model trained with condition dropout: use \"class\"",
            ))
        }
        Some("class") => false,
        Some(g) => {
            return Err(ApiError::bad(
                "control_guidance",
                format!("{g:?}: expected \"joint\" or \"class\""),
            ))
        }
    };
    let img = decode_image("condition", b64, lim.max_image_side)?;
    let thresholds = canny
        .unwrap_or(false)
        .then_some((arpg::control::CANNY_LOW, arpg::control::CANNY_HIGH));
    let (t, _, _) = arpg::control::condition_of(&img, c, side, thresholds)
        .map_err(|e| ApiError::bad("condition", format!("{e:#}")))?;
    Ok(Some((t, guide)))
}

/// ImageNet models with no classes asked for: `arpg sample`'s demo classes.
const DEMO_CLASSES: &[usize] = &[207, 360, 387, 974, 88, 979, 417, 279];

pub fn generate_work(
    r: &GenerateReq,
    names: &ClassNames,
    m: &ModelShape,
    lim: &Limits,
) -> Result<(Work, SampleConfig, u64), ApiError> {
    let classes: Vec<usize> = match &r.classes {
        Some(c) if c.is_empty() => return Err(ApiError::bad("classes", "classes is empty")),
        Some(c) => c
            .iter()
            .enumerate()
            .map(|(i, c)| names.resolve(&format!("classes[{i}]"), c))
            .collect::<Result<_, _>>()?,
        None if m.num_classes == 1000 => DEMO_CLASSES.to_vec(),
        None => (0..m.num_classes).collect(),
    };
    let per_class = r.per_class.unwrap_or(1);
    if per_class == 0 {
        return Err(ApiError::bad("per_class", "per_class must be at least 1"));
    }
    let total = classes.len().saturating_mul(per_class);
    if total > lim.max_images {
        return Err(ApiError::bad(
            if r.per_class.is_some() {
                "per_class"
            } else {
                "classes"
            },
            format!(
                "{total} images asked for, at most {} per request",
                lim.max_images
            ),
        ));
    }
    let sc = r.decoding().config(m.grid * m.grid, m.vocab)?;
    let all: Vec<usize> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, per_class))
        .collect();
    let chunks: VecDeque<Vec<usize>> = all
        .chunks(crate::engine::SAMPLE_CHUNK)
        .map(|c| c.to_vec())
        .collect();
    Ok((
        Work::Generate {
            chunks,
            order_per_sample: r.order_per_sample.unwrap_or(false),
        },
        sc,
        r.seed.unwrap_or(0),
    ))
}

/// Decode a base64 image (a data URL is accepted) within the dimension limit, before any
/// pixel buffer is allocated (decompression bombs are refused from the header).
pub fn decode_image(field: &str, b64: &str, max_side: u32) -> Result<RgbImage, ApiError> {
    let data = match b64.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => b64,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(field, format!("not base64: {e}")))?;
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad(field, format!("cannot read the image: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::bad(field, "not a PNG or JPEG image"));
    }
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .ok_or_else(|| ApiError::bad(field, "cannot read the image's size"))?;
    if w == 0 || h == 0 || w > max_side || h > max_side {
        return Err(ApiError::bad(
            field,
            format!("the image is {w}x{h} pixels; each side must be in 1..={max_side}"),
        ));
    }
    // The JPEG decoder turns garbled or cut data into grey blocks without an error.
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        arpg::tokenizer::jpeg_check::validate(&bytes)
            .map_err(|e| ApiError::bad(field, format!("the image {e}")))?;
    }
    let mut reader = reader;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(512 << 20);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| ApiError::bad(field, format!("cannot decode the image: {e}")))?;
    Ok(img.to_rgb8())
}

fn samples(v: Option<usize>, lim: &Limits) -> Result<usize, ApiError> {
    let n = v.unwrap_or(1);
    if n == 0 || n > lim.max_images {
        return Err(ApiError::bad(
            "samples",
            format!("samples {n} must be in 1..={}", lim.max_images),
        ));
    }
    Ok(n)
}

/// The inpainting job and the tokens of the known cells; `encode` turns the resized image
/// into model tokens.
pub fn inpaint_work(
    r: &InpaintReq,
    names: &ClassNames,
    m: &ModelShape,
    lim: &Limits,
    encode: impl FnOnce(&RgbImage) -> anyhow::Result<Vec<u32>>,
) -> Result<(Work, SampleConfig, u64), ApiError> {
    let class = names.resolve("class", &r.class)?;
    let samples = samples(r.samples, lim)?;
    let src = decode_image("image", &r.image, lim.max_image_side)?;
    let mask = decode_image("mask", &r.mask, lim.max_image_side)?;
    if src.dimensions() != mask.dimensions() {
        return Err(ApiError::bad(
            "mask",
            format!(
                "the mask is {}x{} but the image {}x{}: they must be the same size",
                mask.width(),
                mask.height(),
                src.width(),
                src.height()
            ),
        ));
    }
    let size = m.grid * m.patch;
    let src = arpg::tokenizer::image::center_crop_resize(&src, size);
    let mask = arpg::tokenizer::image::center_crop_resize(&mask, size);
    let regen = token_mask(size, size, m.patch, |x, y| {
        let p = mask.get_pixel(x as u32, y as u32).0;
        (p[0] as u32 + p[1] as u32 + p[2] as u32) >= 3 * 128
    });
    if !regen.contains(&true) {
        return Err(ApiError::bad(
            "mask",
            "the mask marks nothing to regenerate (white = regenerate)",
        ));
    }
    if !regen.contains(&false) {
        return Err(ApiError::bad(
            "mask",
            "the mask covers the whole image: that is plain sampling, use /v1/generate",
        ));
    }
    let tokens = encode(&src).map_err(|e| ApiError::bad("image", format!("{e:#}")))?;
    let known: Vec<(usize, u32)> = (0..tokens.len())
        .filter(|&i| !regen[i])
        .map(|i| (i, tokens[i]))
        .collect();
    let unknown: Vec<usize> = (0..tokens.len()).filter(|&i| regen[i]).collect();
    // Checked against the whole grid as `arpg inpaint` does; the worker caps the steps at
    // the unknown count.
    let sc = r.decoding().config(m.grid * m.grid, m.vocab)?;
    Ok((
        Work::Inpaint {
            class,
            samples,
            known,
            unknown,
        },
        sc,
        r.seed.unwrap_or(0),
    ))
}

pub fn outpaint_work(
    r: &OutpaintReq,
    names: &ClassNames,
    m: &ModelShape,
    lim: &Limits,
    encode: impl FnOnce(&RgbImage) -> anyhow::Result<Vec<u32>>,
) -> Result<(Work, SampleConfig, u64), ApiError> {
    let class = names.resolve("class", &r.class)?;
    let samples = samples(r.samples, lim)?;
    let p = m.patch;
    let max_pad = (lim.max_outpaint.saturating_sub(1)) * m.grid * p;
    let mut pads = [0usize; 4];
    for (i, (name, v)) in [
        ("left", r.left),
        ("right", r.right),
        ("top", r.top),
        ("bottom", r.bottom),
    ]
    .into_iter()
    .enumerate()
    {
        let v = v.unwrap_or(0);
        if v % p != 0 {
            return Err(ApiError::bad(
                name,
                format!("{name} {v} is not a multiple of the {p}-pixel patch"),
            ));
        }
        pads[i] = v;
    }
    if pads[0] + pads[1] > max_pad || pads[2] + pads[3] > max_pad {
        return Err(ApiError::bad(
            if pads[0] + pads[1] > max_pad {
                "right"
            } else {
                "bottom"
            },
            format!("pads on one axis may add at most {max_pad} pixels"),
        ));
    }
    if pads.iter().sum::<usize>() == 0 {
        return Err(ApiError::bad(
            "right",
            "give at least one of left, right, top, bottom (pixels to add)",
        ));
    }
    let src = decode_image("image", &r.image, lim.max_image_side)?;
    let g = m.grid;
    let src = arpg::tokenizer::image::center_crop_resize(&src, g * p);
    let tokens = encode(&src).map_err(|e| ApiError::bad("image", format!("{e:#}")))?;
    let base = Canvas::from_tokens(g, g, &tokens, &vec![false; g * g])
        .map_err(|e| ApiError::bad("image", e.to_string()))?;
    let canvas = base.pad(pads[2] / p, pads[3] / p, pads[0] / p, pads[1] / p);
    let sc = r.decoding().config(g * g, m.vocab)?;
    Ok((
        Work::Outpaint {
            class,
            samples,
            canvas,
        },
        sc,
        r.seed.unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_classes_resolve_by_id_full_name_or_synonym() {
        let n = ClassNames::for_classes(1000);
        assert_eq!(n.names.len(), 1000);
        let id = |s: &str| n.resolve("classes[0]", &ClassRef::Name(s.into())).unwrap();
        assert_eq!(id("golden retriever"), 207);
        assert_eq!(id("Tinca tinca"), 0);
        assert_eq!(id("tench, Tinca tinca"), 0);
        assert_eq!(id("red panda"), 387);
        assert_eq!(id("207"), 207);
        let e = n
            .resolve("classes[1]", &ClassRef::Name("unicorn".into()))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("classes[1]"));
        assert!(n.resolve("class", &ClassRef::Id(1000)).is_err());
        // Digits: the names are the digits.
        let d = ClassNames::for_classes(10);
        assert_eq!(d.resolve("class", &ClassRef::Name("7".into())).unwrap(), 7);
    }

    #[test]
    fn an_image_over_the_size_limit_is_refused_from_its_header() {
        let mut png = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(300, 20)
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
        let e = decode_image("image", &b64, 256).unwrap_err();
        assert!(e.message.contains("300x20"), "{}", e.message);
        assert_eq!(decode_image("image", &b64, 300).unwrap().width(), 300);
    }

    #[test]
    fn a_jpeg_with_a_cut_scan_is_refused_not_decoded_grey() {
        let img =
            image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 9]));
        let mut jpg = std::io::Cursor::new(Vec::new());
        img.write_to(&mut jpg, image::ImageFormat::Jpeg).unwrap();
        let jpg = jpg.into_inner();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        assert_eq!(decode_image("mask", &b64(&jpg), 256).unwrap().width(), 64);
        // The end of the scan data gone, the end-of-image marker kept: the decoder alone
        // fills the missing blocks with grey.
        let mut cut = jpg[..jpg.len() * 9 / 10].to_vec();
        cut.extend_from_slice(&[0xFF, 0xD9]);
        assert!(image::load_from_memory(&cut).is_ok());
        let e = decode_image("mask", &b64(&cut), 256).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("mask"));
        assert!(e.message.contains("corrupt JPEG"), "{}", e.message);
    }
}
