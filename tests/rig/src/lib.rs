//! The real-guest test rig.
