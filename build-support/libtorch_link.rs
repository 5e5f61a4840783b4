//! Link settings for every package whose binaries or tests link libtorch (`worker/build.rs`
//! and `cli/build.rs` include this file): a `cargo:rustc-link-arg` reaches only the targets of
//! the package that emits it, so each such package emits these itself.
//!
//! - Keeps libtorch_cuda linked. The linker drops it as unused, and then tch never sees a GPU
//!   (checked with `contrail info` on an H100).
//! - Records libtorch's lib folder as an rpath, so binaries run without LD_LIBRARY_PATH.

pub fn emit() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return;
    };
    let lib = std::path::Path::new(&libtorch).join("lib");
    if !lib.join("libtorch_cpu.so").exists() {
        panic!(
            "libtorch was not found at {} (LIBTORCH={libtorch}). Run `bash scripts/setup.sh`, \
             which installs PyTorch 2.11.0 into .venv and links it to ./libtorch.",
            lib.display()
        );
    }
    // torch-sys links torch_cuda with a plain -l, and rustc places link args after the
    // libraries, so a bare --no-as-needed would come too late: name the library again
    // inside the --no-as-needed region so its NEEDED entry survives.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
