//! `kvcd`: the node agent.

fn main() -> std::process::ExitCode {
    kvcd::cli::kvcd_main()
}
