// libtorch_cuda kept linked and libtorch's rpath, for this package's binaries and tests; and
// the C++ shim over the libtorch features tch does not wrap (csrc/torch_ext.cpp).
#[path = "../build-support/libtorch_link.rs"]
mod libtorch_link;

fn main() {
    libtorch_link::emit();
    build_torch_ext();
}

/// Compiles csrc/torch_ext.cpp against the headers of the libtorch tch links (the same
/// LIBTORCH folder, C++ standard and ABI flags torch-sys uses for its own C++ wrapper).
fn build_torch_ext() {
    println!("cargo:rerun-if-changed=csrc/torch_ext.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let libtorch = std::env::var("LIBTORCH").unwrap_or_else(|_| {
        panic!("LIBTORCH is not set: run `bash scripts/setup.sh` (it links ./libtorch)")
    });
    let include = std::path::Path::new(&libtorch).join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/torch_ext.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // libtorch's headers are not warning-clean; the shim's own code is small and reviewed.
        .warnings(false)
        .compile("contrail_torch_ext");
}
