//! The command line: one file per subcommand, each a thin call into the library.
