//! The worker's CPU suite: one test binary (linking libtorch once) for every test that needs no
//! GPU. Multi-process tests re-run this binary, filtered to a child test by its full path.
//!
//! `cargo test -p contrail-worker --test cpu [FILTER]`

mod accumulation_equivalence;
mod bert_text;
mod clip_towers_conformance;
mod collectives;
mod embed_export;
mod eval_conformance;
mod gradient_equivalence;
mod loss_scale_conformance;
mod moe_expert_parallel;
mod moe_gating_conformance;
mod moe_step_equivalence;
mod objective_conformance;
mod objective_equivalence;
mod online_eval;
mod optim_conformance;
mod swav_conformance;
