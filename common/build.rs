fn main() {
    println!("cargo:rerun-if-changed=proto/contrail.proto");
    if std::env::var_os("PROTOC").is_none() && which("protoc").is_none() {
        panic!(
            "protoc (the protobuf compiler) was not found. Install it with \
             `bash scripts/setup.sh` (it runs `apt-get install -y protobuf-compiler`) \
             or set PROTOC to its path."
        );
    }
    tonic_prost_build::configure()
        .compile_protos(&["proto/contrail.proto"], &["proto"])
        .expect("compiling proto/contrail.proto");
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
