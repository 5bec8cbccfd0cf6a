//! Agent protocol (filled by the agent issue).
