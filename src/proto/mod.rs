//! The libvirt RPC wire protocol, sans-IO: frame headers, XDR primitives, and the handful of
//! message bodies the proxy itself reads or writes before handing a connection to the relay.
//! Nothing here touches a socket or a clock. Facts: `shared/docs/libvirt-rpc.md` §1–§5.

pub mod frame;
pub mod msg;
pub mod set_identity;
pub mod xdr;

pub use frame::{FrameError, Header, MsgStatus, MsgType};

/// Program numbers (libvirt-rpc.md §1.2).
pub mod program {
    /// The main remote protocol.
    pub const REMOTE: u32 = 0x2000_8086;
    /// `virDomainQemu*` APIs.
    pub const QEMU: u32 = 0x2000_8087;
    /// `virDomainLxc*` APIs.
    pub const LXC: u32 = 0x0006_8000;
    /// Keepalive, intercepted below dispatch by every peer.
    pub const KEEPALIVE: u32 = 0x6b65_6570;
    /// The admin protocol (admin socket only).
    pub const ADMIN: u32 = 0x0690_0690;
}

/// REMOTE procedure numbers the proxy cares about (libvirt-rpc.md appendix A).
pub mod remote_proc {
    pub const CONNECT_OPEN: i32 = 1;
    pub const CONNECT_CLOSE: i32 = 2;
    pub const CONNECT_SUPPORTS_FEATURE: i32 = 60;
    pub const AUTH_LIST: i32 = 66;
    pub const AUTH_SASL_INIT: i32 = 67;
    pub const AUTH_SASL_START: i32 = 68;
    pub const AUTH_SASL_STEP: i32 = 69;
    pub const AUTH_POLKIT: i32 = 70;
    pub const CONNECT_SET_IDENTITY: i32 = 419;
}

/// KEEPALIVE procedures.
pub mod keepalive_proc {
    pub const PING: i32 = 1;
    pub const PONG: i32 = 2;
}

/// `virDrvFeature` values exchanged through CONNECT_SUPPORTS_FEATURE.
pub mod feature {
    pub const PROGRAM_KEEPALIVE: i32 = 10;
}

/// `remote_auth_type`.
pub mod auth_type {
    pub const NONE: i32 = 0;
    pub const SASL: i32 = 1;
    pub const POLKIT: i32 = 2;
}

/// Size limits enforced on every frame (libvirt-rpc.md §1.6).
pub mod limits {
    /// The length word plus the 24-byte header.
    pub const HEADER_LEN: usize = 28;
    /// Largest frame excluding the length word.
    pub const MESSAGE_MAX: u32 = 33_554_432;
    /// Largest legal value of the length word.
    pub const FRAME_MAX: u32 = MESSAGE_MAX + 4;
    /// Most fds one message may carry.
    pub const NUM_FDS_MAX: u32 = 32;
}
