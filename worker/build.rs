// Keeps libtorch_cuda linked (the linker would drop it as unused, and then tch never sees a
// GPU), and records libtorch's lib folder as an rpath so binaries run without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        if !lib.join("libtorch_cpu.so").exists() {
            panic!(
                "libtorch was not found at {} (LIBTORCH={libtorch}). Run `bash scripts/setup.sh`, \
                 which installs PyTorch 2.11.0 into .venv and links it to ./libtorch.",
                lib.display()
            );
        }
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
