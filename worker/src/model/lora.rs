//! LoRA adapters (`[model.adapters]`, Hu et al. 2021; PEFT's `LoraConfig` without dropout):
//! beside a frozen projection W (out × in) a pair A (rank × in, PyTorch's default `Linear`
//! init, as PEFT's) and B (out × rank, zeros), and the projection computes
//! W x + (alpha / rank) B A x, so an adapted model starts as its base model. The pair is
//! named after the projection: `<module>.lora_a` / `.lora_b` beside `<module>.weight`
//! (`attn.in_proj.lora_*` beside open_clip's packed `attn.in_proj_weight`).
//! [`merged_weight_name`] and `ContrastiveModel::merged_variables` fold them into W for an
//! export.

use crate::nn::torch_default_uniform;
use contrail_common::config::AdapterSettings;
use tch::nn::{self, Init};
use tch::Tensor;

#[derive(Debug)]
pub struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Lora {
    /// The adapter of a `c_in → c_out` projection, its variables under `p`.
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, settings: &AdapterSettings) -> Self {
        let rank = i64::from(settings.rank);
        Self {
            a: p.var("lora_a", &[rank, c_in], torch_default_uniform(c_in)),
            b: p.var("lora_b", &[c_out, rank], Init::Const(0.0)),
            scale: settings.scale(),
        }
    }

    /// (alpha / rank) B A x for x (…, c_in).
    pub fn delta(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.a.tr()).matmul(&self.b.tr()) * self.scale
    }

    /// The adapter folded into W: W + (alpha / rank) B A.
    pub fn merge(&self, w: &Tensor) -> Tensor {
        w + self.b.matmul(&self.a) * self.scale
    }
}

/// `x.linear(w, b)` plus the adapter's update when there is one.
pub fn adapted(x: &Tensor, w: &Tensor, b: Option<&Tensor>, lora: Option<&Lora>) -> Tensor {
    let y = x.linear(w, b);
    match lora {
        Some(l) => y + l.delta(x),
        None => y,
    }
}

/// The weight an adapter variable `<module>.lora_a` or `.lora_b` belongs to: `<module>.weight`,
/// or open_clip's packed `attn.in_proj_weight` for `attn.in_proj.lora_*`; None for another name.
pub fn merged_weight_name(adapter: &str) -> Option<String> {
    let module = adapter
        .strip_suffix(".lora_a")
        .or_else(|| adapter.strip_suffix(".lora_b"))?;
    Some(match module.strip_suffix("attn.in_proj") {
        Some(block) => format!("{block}attn.in_proj_weight"),
        None => format!("{module}.weight"),
    })
}

/// Whether a variable is an adapter's.
pub fn is_adapter(name: &str) -> bool {
    name.ends_with(".lora_a") || name.ends_with(".lora_b")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_name_the_weight_they_fold_into() {
        assert_eq!(
            merged_weight_name("visual.transformer.resblocks.3.attn.in_proj.lora_a").as_deref(),
            Some("visual.transformer.resblocks.3.attn.in_proj_weight")
        );
        assert_eq!(
            merged_weight_name("transformer.resblocks.0.mlp.c_fc.lora_b").as_deref(),
            Some("transformer.resblocks.0.mlp.c_fc.weight")
        );
        assert_eq!(
            merged_weight_name("bert.encoder.layer.1.attention.self.query.lora_a").as_deref(),
            Some("bert.encoder.layer.1.attention.self.query.weight")
        );
        assert_eq!(merged_weight_name("visual.proj"), None);
    }

    #[test]
    fn the_merged_weight_computes_what_the_adapter_adds() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let settings = AdapterSettings {
            rank: 2,
            alpha: 3.0,
            ..Default::default()
        };
        let lora = Lora::new(&(vs.root() / "m"), 5, 4, &settings);
        tch::no_grad(|| {
            lora.b
                .shallow_clone()
                .copy_(&Tensor::randn([4, 2], tch::kind::FLOAT_CPU))
        });
        let w = Tensor::randn([4, 5], tch::kind::FLOAT_CPU);
        let x = Tensor::randn([3, 5], tch::kind::FLOAT_CPU);
        let adapted_y = adapted(&x, &w, None, Some(&lora));
        let merged_y = x.linear(&lora.merge(&w), None::<&Tensor>);
        let diff = (adapted_y - merged_y).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }
}
