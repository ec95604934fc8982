//! ferry-uring: io_uring channels for the Ferry migration stream (not yet written).
