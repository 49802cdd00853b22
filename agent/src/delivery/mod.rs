//! Getting exoagent onto an instance: the cloud-init userdata that configures (and, on stock
//! images, downloads) it, and the files `exoagent install` puts in place.

pub mod bake;
pub mod exosphere;
pub mod install;
pub mod userdata;
