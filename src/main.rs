#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    coffre::cli::main()
}
