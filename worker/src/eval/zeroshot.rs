//! Zero-shot classification for image–text models, as OpenCLIP's `build_zero_shot_classifier`
//! and `zero_shot_eval`: each class's prompts ("a photo of a {}.") are embedded by the text
//! tower, L2-normalised, averaged and normalised again; an image's classes are ranked by the
//! inner product of its normalised embedding with those class vectors.

use tch::{Kind, Tensor};

use super::bank::{Bank, EvalError, Result};
use super::{top_k_accuracy, TopK, DEFAULT_CHUNK_ROWS};
use crate::nn::l2_normalize;

/// The prompt used when none is given; `{}` is the class name.
pub const DEFAULT_TEMPLATES: &[&str] = &["a photo of a {}."];

/// OpenAI's 80 ImageNet prompt templates (CLIP's zero-shot notebook), open_clip's
/// `OPENAI_IMAGENET_TEMPLATES`; `"openai"` in a template list stands for them.
pub const OPENAI_IMAGENET_TEMPLATES: [&str; 80] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
];

/// open_clip's `SIMPLE_IMAGENET_TEMPLATES`; `"simple"` in a template list stands for them.
pub const SIMPLE_IMAGENET_TEMPLATES: [&str; 7] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
];

/// `templates` with the named sets ("openai", "simple") replaced by their templates.
pub fn expand_templates(templates: &[String]) -> Vec<String> {
    templates
        .iter()
        .flat_map(|t| match t.as_str() {
            "openai" => OPENAI_IMAGENET_TEMPLATES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "simple" => SIMPLE_IMAGENET_TEMPLATES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            _ => vec![t.clone()],
        })
        .collect()
}

/// The prompts of one class: every template with `{}` replaced by `class`.
pub fn prompts(class: &str, templates: &[String]) -> Vec<String> {
    templates.iter().map(|t| t.replace("{}", class)).collect()
}

/// Refuses a template without the `{}` the class name goes into.
pub fn check_templates(templates: &[String]) -> Result<()> {
    if templates.is_empty() {
        return Err(EvalError::Invalid("zero-shot: no prompt templates".into()));
    }
    match templates.iter().find(|t| !t.contains("{}")) {
        Some(t) => Err(EvalError::Invalid(format!(
            "zero-shot: template {t:?} has no {{}} for the class name"
        ))),
        None => Ok(()),
    }
}

/// The classifier `(dim, classes)` from each class's prompt embeddings `(prompts, dim)`.
pub fn classifier(per_class: &[Tensor]) -> Result<Tensor> {
    if per_class.is_empty() {
        return Err(EvalError::Invalid("zero-shot: no classes".into()));
    }
    let columns: Vec<Tensor> = per_class
        .iter()
        .map(|p| {
            let mean = l2_normalize(&p.to_kind(Kind::Float)).mean_dim(0, true, Kind::Float);
            l2_normalize(&mean).squeeze_dim(0)
        })
        .collect();
    Ok(Tensor::stack(&columns, 1))
}

/// Top-1/top-5 of `images` (labelled) under `classifier` `(dim, classes)`.
pub fn evaluate(images: &Bank, classifier: &Tensor) -> Result<TopK> {
    let (dim, classes) = (classifier.size()[0], classifier.size()[1]);
    if images.dim() != dim {
        return Err(EvalError::DimMismatch {
            bank: images.name.clone(),
            got: images.dim(),
            other: "the zero-shot classifier".into(),
            want: dim,
        });
    }
    images.labels_within(classes)?;
    let labels = images.labels()?;
    let w = classifier.to_device(images.device());
    Ok(top_k_accuracy(
        images.rows(),
        DEFAULT_CHUNK_ROWS,
        labels,
        5,
        |start, len| {
            l2_normalize(&images.embeddings.narrow(0, start, len))
                .matmul(&w)
                .argsort(1, true)
        },
    ))
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    #[test]
    fn images_go_to_the_class_whose_prompts_they_resemble() {
        let cpu = (Kind::Float, Device::Cpu);
        // Class 0's prompts point along x, class 1's along y (at different lengths: the
        // normalisation before averaging makes that irrelevant).
        let c0 = Tensor::from_slice(&[3.0f32, 0.1, 0.5, -0.1]).view([2, 2]);
        let c1 = Tensor::from_slice(&[0.0f32, 9.0]).view([1, 2]);
        let w = classifier(&[c0, c1]).unwrap();
        assert_eq!(w.size(), [2, 2]);
        let norms = Vec::<f32>::try_from(w.norm_scalaropt_dim(2, [0], false)).unwrap();
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-6));
        let img = Tensor::from_slice(&[1.0f32, 0.2, 0.1, 1.0, 2.0, -0.1]).view([3, 2]);
        let bank = Bank::new("img", img, Some(Tensor::from_slice(&[0i64, 1, 1]))).unwrap();
        let r = evaluate(&bank, &w).unwrap();
        assert!((r.top1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.top5, 1.0);
        let three = Bank::new(
            "img",
            Tensor::ones([1, 2], cpu),
            Some(Tensor::from_slice(&[2i64])),
        )
        .unwrap();
        assert!(evaluate(&three, &w)
            .err()
            .unwrap()
            .to_string()
            .contains("outside 0..2"));
        assert_eq!(
            prompts("shirt", &["a photo of a {}.".into(), "{}".into()]),
            ["a photo of a shirt.", "shirt"]
        );
        assert!(check_templates(&["a photo".into()]).is_err());
        let expanded = expand_templates(&["openai".into(), "a {} sketch.".into()]);
        assert_eq!(expanded.len(), 81);
        assert_eq!(expanded[0], "a bad photo of a {}.");
        assert_eq!(expanded[80], "a {} sketch.");
        assert!(check_templates(&expanded).is_ok());
    }
}
