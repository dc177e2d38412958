//! Conformance suite (stub, to be written).
