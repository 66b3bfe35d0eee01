//! The availability level of a VM.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How much protection a VM gets. Ordered from least to most: `none < ha < ft`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Left alone: no monitoring, no replication.
    None,
    /// High availability: the VM is monitored, its volumes replicated; on host failure it is evacuated,
    /// on a crash restarted.
    Ha,
    /// Fault tolerance: the VM is statepointed to a secondary on another host every epoch.
    Ft,
}

impl Level {
    /// Every level, least protected first.
    pub const ALL: [Level; 3] = [Level::None, Level::Ha, Level::Ft];

    /// The name used in the API, the store and on the command line: `none`, `ha` or `ft`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::Ha => "ha",
            Level::Ft => "ft",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LevelError {
    /// The text is not one of the level names.
    #[error("unknown availability level {value:?}: expected one of none, ha, ft")]
    Unknown {
        /// The text that was given.
        value: String,
    },
}

impl FromStr for Level {
    type Err = LevelError;

    /// Parses `none`, `ha` or `ft`, ignoring ASCII case and surrounding white space.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Level::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| LevelError::Unknown {
                value: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for l in Level::ALL {
            assert_eq!(l.to_string().parse::<Level>().unwrap(), l);
        }
        assert_eq!(" FT ".parse::<Level>().unwrap(), Level::Ft);
        assert_eq!("Ha".parse::<Level>().unwrap(), Level::Ha);
    }

    #[test]
    fn bad_value_is_named() {
        let e = "gold".parse::<Level>().unwrap_err();
        assert_eq!(
            e,
            LevelError::Unknown {
                value: "gold".into()
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("\"gold\"") && msg.contains("none, ha, ft"),
            "{msg}"
        );
        assert!("".parse::<Level>().is_err());
    }

    #[test]
    fn serde_uses_lowercase_names() {
        assert_eq!(serde_json::to_string(&Level::Ft).unwrap(), "\"ft\"");
        assert_eq!(
            serde_json::from_str::<Level>("\"none\"").unwrap(),
            Level::None
        );
        let e = serde_json::from_str::<Level>("\"gold\"").unwrap_err();
        assert!(e.to_string().contains("gold"), "{e}");
    }

    #[test]
    fn ordered_by_protection() {
        assert!(Level::None < Level::Ha && Level::Ha < Level::Ft);
    }
}
