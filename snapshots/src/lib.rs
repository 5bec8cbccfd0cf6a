//! Snapshot format and templates (filled by the snapshot issue).
