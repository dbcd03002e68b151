//! virtproxyd-rs: a drop-in replacement for libvirt's virtproxyd.
//!
//! Where things are:
//! - a frame is parsed: [`proto::frame`] (header) and [`relay::tracker`] (boundaries in a stream);
//! - the pre-open exchange: [`handshake`] (sans-IO), routing in [`route`], identity in [`identity`];
//! - a connection's state and the steps that move it (TLS shuttle, pre-open I/O, relay): [`conn`];
//! - bytes are spliced: [`relay::pump`]; TLS: [`tls`] (handshake threads, kTLS set-up, shuttle);
//! - under both `relay` and `tls`, which do not import each other: [`sys`] (syscalls, kTLS
//!   record types, [`sys::FrameCutter`]);
//! - the loop: [`worker`] (reactor: [`reactor`], io_uring or epoll; inbox, deadlines, pools);
//!   what the acceptor, handshake threads and workers share and hand each other: [`shared`];
//! - a client is authenticated: [`handshake`] drives it; [`polkit`] and [`sasl`] do the slow
//!   parts on [`offload`] threads; the SASL security layer's copy relay: [`relay::copy`];
//! - listeners and accept: [`listen`], [`server`] (per-source pre-open rates: [`flood`]);
//!   process lifecycle: [`daemon`]; config: [`config`];
//! - the metrics endpoint (its own thread) and the relay's counter blocks: [`metrics`];
//! - restart without dropping a client (quiesce, carry, adopt): [`handover`].

pub mod activation;
pub mod admin;
pub mod cli;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod flood;
pub mod glob;
pub mod handover;
pub mod handshake;
pub mod identity;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod offload;
pub mod polkit;
pub mod proto;
pub mod reactor;
pub mod registry;
pub mod relay;
pub mod route;
pub mod sasl;
pub mod server;
pub mod shared;
pub mod sys;
pub mod timers;
pub mod tls;
pub mod worker;
