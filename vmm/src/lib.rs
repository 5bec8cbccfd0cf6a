//! thaw VMM library: see README
