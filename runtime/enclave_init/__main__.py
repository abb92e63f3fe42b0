"""``python -m runtime.enclave_init``."""

from runtime.enclave_init import main

main()
