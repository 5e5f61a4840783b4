//! The `contrail` binary keeps libtorch_cuda as a dynamic dependency. Without it, CUDA is never
//! detected on a GPU machine (seen on an H100: `contrail info` said `cuda available: false`
//! until worker/build.rs named the library inside a --no-as-needed region).

#[test]
fn contrail_binary_links_libtorch_cuda() {
    let libtorch = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../libtorch/lib");
    if !libtorch.join("libtorch_cuda.so").exists() {
        eprintln!("skipped: this libtorch has no libtorch_cuda.so (a CPU-only build)");
        return;
    }
    let out = std::process::Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_contrail")])
        .output()
        .expect("running readelf (Debian package binutils)");
    assert!(out.status.success(), "readelf failed");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic
            .lines()
            .any(|l| l.contains("(NEEDED)") && l.contains("[libtorch_cuda.so]")),
        "libtorch_cuda.so is not a NEEDED entry of the contrail binary:\n{dynamic}"
    );
}
