"""kms: a local KMS daemon speaking the AWS KMS JSON protocol that releases keys only to
attested enclaves, and the enclave-side client."""
