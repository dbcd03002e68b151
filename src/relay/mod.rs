//! The data path after CONNECT_OPEN: two frame-aware pumps per connection (client→daemon and
//! daemon→client). A connection's life is in `conn/LIFECYCLE.md`.

pub mod copy;
pub mod layer;
pub mod owed;
pub mod pump;
pub mod tracker;

pub use copy::{CopyDrive, CopyRelay};
pub use layer::SecurityLayer;
pub use owed::Owed;
pub use pump::{Drive, Pools, Pump, PumpError};
pub use tracker::Direction;
