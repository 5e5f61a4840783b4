// libtorch_cuda kept linked and libtorch's rpath, for this package's binaries and tests.
#[path = "../build-support/libtorch_link.rs"]
mod libtorch_link;

fn main() {
    libtorch_link::emit();
}
