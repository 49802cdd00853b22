//! The vocabulary every layer shares: service kinds and the other names that are published.
//! A leaf: it imports nothing from the crate, so any module may use it without a cycle.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Every service exoagent knows by name. Only some are implemented in this version (see
/// `services::implemented`); the others are refused by name when enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// JupyterLab in a virtual environment, on port 8888.
    #[serde(rename = "jupyterlab")]
    JupyterLab,
    /// RStudio Server, on port 8787.
    #[serde(rename = "rstudio")]
    RStudio,
    /// A VNC desktop on display :1.
    Desktop,
    /// guacd plus the web side served by the agent, on port 49528.
    Guacamole,
}

impl ServiceKind {
    /// All kinds, in report order.
    pub const ALL: [ServiceKind; 4] = [
        ServiceKind::JupyterLab,
        ServiceKind::RStudio,
        ServiceKind::Desktop,
        ServiceKind::Guacamole,
    ];

    /// The stable lowercase name used in config, tags, the API and log file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JupyterLab => "jupyterlab",
            Self::RStudio => "rstudio",
            Self::Desktop => "desktop",
            Self::Guacamole => "guacamole",
        }
    }

    /// The port the service answers on when its `port` key is not set (DESIGN §4.5: what
    /// Exosphere builds its links from).
    pub fn default_port(self) -> u16 {
        match self {
            Self::JupyterLab => 8888,
            Self::RStudio => 8787,
            Self::Desktop => 5901,
            Self::Guacamole => 49528,
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service name that is not one of [`ServiceKind::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown service '{0}' (known: jupyterlab, rstudio, desktop, guacamole)")]
pub struct UnknownService(pub String);

impl FromStr for ServiceKind {
    type Err = UnknownService;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownService(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in ServiceKind::ALL {
            assert_eq!(kind.as_str().parse::<ServiceKind>().unwrap(), kind);
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.as_str())
            );
        }
        assert!("jupyter".parse::<ServiceKind>().is_err());
    }
}
