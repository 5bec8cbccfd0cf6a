fn main() {
    thaw_agent::cli::main()
}
