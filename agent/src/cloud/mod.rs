//! OpenStack instance identity (config drive first).
