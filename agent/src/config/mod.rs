//! The desired state: layered TOML fragments, strictly parsed, merged and validated in full
//! before anything on the machine changes (DESIGN §4.1).

pub mod settings;

pub use settings::*;
