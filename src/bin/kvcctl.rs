//! `kvcctl`: the admin client.

fn main() -> std::process::ExitCode {
    kvcd::cli::kvcctl_main()
}
