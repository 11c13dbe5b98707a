//! The built-in demo models, a provider that needs no upstream: `veo3` renders a real
//! animated GIF, `demo-image` a real PNG, `echo` a text file. They exercise the whole
//! lifecycle (progress, outputs, failures) on a laptop and in tests; real providers plug in
//! behind the same [`Generator`] port.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ports::{GenerateError, GenerateOutcome, Generated, Generator, Job, ProgressSink};
use crate::registry::{DurationRule, ModelSpec, ParamKind, ParamSpec, Pricing, Registry};

/// Builds the registry of built-in demo models. `time_scale` multiplies the simulated
/// generation time of `veo3` (1.0: 0.25 s of wall time per second of video; 0: no waiting).
pub fn builtin_registry(time_scale: f64) -> Registry {
    let mut r = Registry::new();
    r.register(ModelSpec {
        prompt_required: true,
        duration: Some(DurationRule {
            min: 1,
            max: 20,
            default: 5,
        }),
        params: vec![
            param(
                "fps",
                ParamKind::Int { min: 1, max: 24 },
                "frames per second (default 8)",
            ),
            seed_param(),
        ],
        pricing: Pricing::PerSecond(10),
        ..ModelSpec::local(
            "veo3",
            "Demo video generator: renders an animated GIF of `duration` seconds from the prompt.",
            demo_generator("video", time_scale).expect("a demo generator"),
        )
    });
    let pixels = ParamKind::Int { min: 16, max: 1024 };
    r.register(ModelSpec {
        prompt_required: true,
        params: vec![
            param("width", pixels.clone(), "pixels (default 512)"),
            param("height", pixels, "pixels (default 512)"),
            seed_param(),
        ],
        pricing: Pricing::Flat(5),
        ..ModelSpec::local(
            "demo-image",
            "Demo image generator: renders a PNG from the prompt.",
            demo_generator("image", time_scale).expect("a demo generator"),
        )
    });
    r.register(ModelSpec {
        max_prompt_chars: 10_000,
        params: vec![
            param(
                "sleep_ms",
                ParamKind::Int {
                    min: 0,
                    max: 60_000,
                },
                "wait this long before finishing",
            ),
            param(
                "fail",
                ParamKind::Str { max_chars: 500 },
                "fail with this message (code generation_failed)",
            ),
        ],
        pricing: Pricing::Flat(1),
        ..ModelSpec::local(
            "echo",
            "Test model: finishes at once with the prompt as a text/plain output.",
            demo_generator("echo", time_scale).expect("a demo generator"),
        )
    });
    r
}

/// The demo generator named `kind` (`video`, `image` or `echo`), for the built-in registry and
/// for catalog entries with `provider = "demo"`. `time_scale` as in [`builtin_registry`].
pub fn demo_generator(kind: &str, time_scale: f64) -> Option<Arc<dyn Generator>> {
    Some(match kind {
        "video" => Arc::new(VideoDemo {
            seconds_per_second: 0.25 * time_scale.max(0.0),
        }),
        "image" => Arc::new(ImageDemo),
        "echo" => Arc::new(Echo),
        _ => return None,
    })
}

/// The demo generators' names, for error messages.
pub const DEMO_KINDS: [&str; 3] = ["video", "image", "echo"];

fn param(name: &str, kind: ParamKind, description: &str) -> ParamSpec {
    ParamSpec {
        name: name.to_string(),
        kind,
        description: description.to_string(),
    }
}

fn seed_param() -> ParamSpec {
    param(
        "seed",
        ParamKind::Int {
            min: 0,
            max: i64::MAX,
        },
        "changes the picture for the same prompt",
    )
}

/// Bytes derived from the prompt and seed, so the same input draws the same picture.
fn palette_seed(job: &Job<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(job.prompt.unwrap_or("").as_bytes());
    h.update(
        job.params
            .get("seed")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .to_le_bytes(),
    );
    h.finalize().into()
}

fn param_u32(job: &Job<'_>, name: &str, default: u32) -> u32 {
    job.params
        .get(name)
        .and_then(Value::as_u64)
        .map_or(default, |v| v as u32)
}

struct Echo;

#[async_trait]
impl Generator for Echo {
    async fn generate(&self, job: Job<'_>, _progress: &mut dyn ProgressSink) -> GenerateOutcome {
        let sleep = param_u32(&job, "sleep_ms", 0);
        if sleep > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(sleep))).await;
        }
        if let Some(msg) = job.params.get("fail").and_then(Value::as_str) {
            return GenerateOutcome::Failed(GenerateError {
                code: "generation_failed".into(),
                message: msg.to_string(),
            });
        }
        GenerateOutcome::Done(vec![Generated {
            bytes: Bytes::copy_from_slice(job.prompt.unwrap_or("").as_bytes()),
            content_type: "text/plain; charset=utf-8",
            extension: "txt",
        }])
    }
}

struct VideoDemo {
    seconds_per_second: f64,
}

const VIDEO_W: u16 = 320;
const VIDEO_H: u16 = 180;

#[async_trait]
impl Generator for VideoDemo {
    async fn generate(&self, job: Job<'_>, progress: &mut dyn ProgressSink) -> GenerateOutcome {
        let duration = job.duration.unwrap_or(5).max(1);
        let fps = param_u32(&job, "fps", 8).clamp(1, 24);
        let frames = duration * fps;
        let seed = palette_seed(&job);
        let per_frame = Duration::try_from_secs_f64(self.seconds_per_second / f64::from(fps))
            .unwrap_or_default();
        let palette = palette(&seed);
        let mut gif_bytes = Vec::new();
        {
            let mut enc = match gif::Encoder::new(&mut gif_bytes, VIDEO_W, VIDEO_H, &palette) {
                Ok(e) => e,
                Err(e) => return encode_failed(e),
            };
            if let Err(e) = enc.set_repeat(gif::Repeat::Infinite) {
                return encode_failed(e);
            }
            for i in 0..frames {
                let pixels = draw_frame(&seed, i, frames);
                let mut frame = gif::Frame::from_indexed_pixels(VIDEO_W, VIDEO_H, pixels, None);
                frame.delay = (100 / fps) as u16;
                if let Err(e) = enc.write_frame(&frame) {
                    return encode_failed(e);
                }
                if !per_frame.is_zero() {
                    tokio::time::sleep(per_frame).await;
                }
                let pct = ((i + 1) * 100 / frames).min(99) as u8;
                if progress.report(pct).await.is_err() {
                    return GenerateOutcome::Aborted;
                }
            }
        }
        GenerateOutcome::Done(vec![Generated {
            bytes: Bytes::from(gif_bytes),
            content_type: "image/gif",
            extension: "gif",
        }])
    }
}

fn encode_failed(e: impl std::fmt::Display) -> GenerateOutcome {
    tracing::error!(error = %e, "encoding failed");
    GenerateOutcome::Failed(GenerateError {
        code: "generation_failed".into(),
        message: "the output could not be encoded".into(),
    })
}

/// 16 colours: a dark-to-light ramp of a prompt-derived hue (0..8) and of its complement (8..16).
fn palette(seed: &[u8; 32]) -> Vec<u8> {
    let (a, b) = (
        [seed[0], seed[1], seed[2]],
        [255 - seed[0], 255 - seed[1], 255 - seed[2]],
    );
    let mut p = Vec::with_capacity(48);
    for base in [a, b] {
        for step in 0..8u16 {
            for c in base {
                p.push(((u16::from(c) * (step + 2)) / 9).min(255) as u8);
            }
        }
    }
    p
}

/// One frame: banded background in the prompt's hue and a ball crossing the frame.
fn draw_frame(seed: &[u8; 32], i: u32, frames: u32) -> Vec<u8> {
    let (w, h) = (i32::from(VIDEO_W), i32::from(VIDEO_H));
    let t = i as f64 / frames.max(1) as f64;
    let cx = (t * f64::from(w)) as i32;
    let cy = h / 2
        + ((t * std::f64::consts::TAU * (1.0 + f64::from(seed[3] % 3))).sin() * f64::from(h / 3))
            as i32;
    let r = 12 + i32::from(seed[4] % 16);
    let band = 8 + i32::from(seed[5] % 24);
    let mut px = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x - cx, y - cy);
            let v = if dx * dx + dy * dy <= r * r {
                8 + ((7 * (r * r - dx * dx - dy * dy)) / (r * r)).clamp(0, 7)
            } else {
                ((y + x / 4 + (i as i32) * 2) / band % 8).abs()
            };
            px.push(v as u8);
        }
    }
    px
}

struct ImageDemo;

#[async_trait]
impl Generator for ImageDemo {
    async fn generate(&self, job: Job<'_>, progress: &mut dyn ProgressSink) -> GenerateOutcome {
        let (w, h) = (
            param_u32(&job, "width", 512),
            param_u32(&job, "height", 512),
        );
        let seed = palette_seed(&job);
        let rgb = tokio::task::spawn_blocking(move || render_image(&seed, w, h)).await;
        let Ok(rgb) = rgb else {
            return encode_failed("render task panicked");
        };
        if progress.report(90).await.is_err() {
            return GenerateOutcome::Aborted;
        }
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let written = enc
            .write_header()
            .and_then(|mut wr| wr.write_image_data(&rgb));
        if let Err(e) = written {
            return encode_failed(e);
        }
        GenerateOutcome::Done(vec![Generated {
            bytes: Bytes::from(out),
            content_type: "image/png",
            extension: "png",
        }])
    }
}

/// Smooth interference pattern coloured by the prompt.
fn render_image(seed: &[u8; 32], w: u32, h: u32) -> Vec<u8> {
    let f = |i: usize| 2.0 + f64::from(seed[i] % 8);
    let (fx, fy, fr) = (f(6), f(7), f(8));
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let (u, v) = (f64::from(x) / f64::from(w), f64::from(y) / f64::from(h));
            let d = ((u - 0.5).powi(2) + (v - 0.5).powi(2)).sqrt();
            let s = ((u * fx).sin() + (v * fy).sin() + (d * fr * 3.0).sin()) / 3.0 * 0.5 + 0.5;
            for c in 0..3 {
                let base = f64::from(seed[9 + c]);
                rgb.push((base * s + (255.0 - base) * (1.0 - s) * 0.5) as u8);
            }
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Abort;
    use serde_json::Map;

    struct Count(Vec<u8>);
    #[async_trait]
    impl ProgressSink for Count {
        async fn report(&mut self, p: u8) -> Result<(), Abort> {
            self.0.push(p);
            Ok(())
        }
    }

    fn job<'a>(prompt: &'a str, duration: Option<u32>, params: &'a Map<String, Value>) -> Job<'a> {
        Job {
            task_id: "t",
            action: "generate",
            prompt: Some(prompt),
            duration,
            params,
        }
    }

    fn local<'r>(reg: &'r Registry, model: &str) -> &'r dyn Generator {
        match &reg.get(model).unwrap().runner {
            crate::registry::Runner::Local(g) => g.as_ref(),
            crate::registry::Runner::Upstream(_) => panic!("{model} is a demo model"),
        }
    }

    #[tokio::test]
    async fn veo3_renders_a_real_gif_with_one_progress_report_per_frame() {
        let reg = builtin_registry(0.0);
        let params = Map::new();
        let mut sink = Count(vec![]);
        let out = local(&reg, "veo3")
            .generate(
                job("A cat walking on the beach", Some(2), &params),
                &mut sink,
            )
            .await;
        let GenerateOutcome::Done(files) = out else {
            panic!("{out:?}")
        };
        assert_eq!(&files[0].bytes[..6], b"GIF89a");
        let decoder = gif::DecodeOptions::new()
            .read_info(&files[0].bytes[..])
            .unwrap();
        let mut decoder = decoder;
        let mut n = 0;
        while decoder.read_next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 16, "2 s at 8 fps");
        assert_eq!(sink.0.len(), 16);
        assert!(sink.0.windows(2).all(|w| w[0] <= w[1]));
    }

    #[tokio::test]
    async fn demo_image_renders_a_png_of_the_requested_size() {
        let reg = builtin_registry(0.0);
        let mut params = Map::new();
        params.insert("width".into(), 40.into());
        params.insert("height".into(), 30.into());
        let out = local(&reg, "demo-image")
            .generate(job("x", None, &params), &mut Count(vec![]))
            .await;
        let GenerateOutcome::Done(files) = out else {
            panic!()
        };
        let dec = png::Decoder::new(std::io::Cursor::new(files[0].bytes.to_vec()))
            .read_info()
            .unwrap();
        assert_eq!((dec.info().width, dec.info().height), (40, 30));
    }

    #[test]
    fn veo3_costs_ten_credits_per_second() {
        let reg = builtin_registry(1.0);
        assert_eq!(reg.get("veo3").unwrap().cost(Some(5)), 50);
        assert_eq!(reg.get("echo").unwrap().cost(None), 1);
    }
}
