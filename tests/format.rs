//! Wrapped-key format v1: golden vectors, Wycheproof, properties, tamper matrix.
