//! The synchronous core: keys, series values, exactly-once windows, shards and the table that
//! routes to them. Nothing here knows about OTLP, HTTP, Prometheus text or tokio; tests drive it
//! without a runtime.

pub mod batch;
pub mod interned;
pub mod interner;
pub mod key;
pub mod keytable;
pub mod layout;
pub mod naming;
pub mod quota;
pub mod series;
pub mod shard;
pub mod table;
pub mod window;
