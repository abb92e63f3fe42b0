"""runtime: measured enclave images (EIF), sandboxed subprocess enclaves, lifecycle and
supervision, the nitro-cli-compatible ``enclave`` CLI and the embedding API."""
