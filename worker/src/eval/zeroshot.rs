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
    }
}
