"""attest: the emulated Nitro Security Module, Nitro-format attestation documents, a local CA,
and one verifier for local and real AWS documents."""
