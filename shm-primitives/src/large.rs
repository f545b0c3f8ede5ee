//! Payloads larger than the largest slot class (placeholder, being written).
