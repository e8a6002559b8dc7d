#![forbid(unsafe_code)]

/// mimalloc instead of glibc's malloc: on the data-key path, glibc's
/// allocator (its arena locks, `malloc_consolidate`) took about a tenth of
/// the server's CPU under load (BENCHMARKS.md, "The data-key path against
/// the null RPC"); mimalloc's thread-local free lists do not contend.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    coffre::cli::main()
}
