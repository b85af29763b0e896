fn main() -> std::process::ExitCode {
    texture_agent::cli::main()
}
