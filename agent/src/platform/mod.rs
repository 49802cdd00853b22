//! The machine: OS detection, package managers, the instance user and its passphrase.
