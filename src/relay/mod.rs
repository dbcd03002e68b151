//! The data path after CONNECT_OPEN: two frame-aware pumps per connection (client→daemon and
//! daemon→client). See LIFECYCLE.md beside this file.

pub mod layer;
pub mod pump;
pub mod tracker;

pub use pump::{Drive, Pools, Pump, PumpError};
